"""Where the words matter: the embedded SmolLM2 through the chat template and a stop string.

Kept to a handful of short greedy generations: SmolLM2 is slow on two busy cores.
"""

import openai
import pydantic
import pytest

from server_harness import API_KEY

pytestmark = pytest.mark.slow


@pytest.fixture()
def smollm2(smollm2_server):
    with openai.OpenAI(base_url=f"{smollm2_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300) as client:
        yield client


def test_chat_answers_through_the_chat_template(smollm2):
    chat = smollm2.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12, temperature=0)
    assert "Paris" in chat.choices[0].message.content


def test_streamed_chat_stops_at_a_stop_string(smollm2):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    stream = smollm2.chat.completions.create(model="smollm2", messages=messages, max_tokens=12, temperature=0,
                                             stop=["Paris"], stream=True)
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert "Paris" not in text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_models_default_name(smollm2):
    assert [model.id for model in smollm2.models.list().data] == ["smollm2"]


class City(pydantic.BaseModel):
    name: str
    country: str
    is_capital: bool


def test_chat_answers_in_the_schema_asked_for(smollm2):
    """The SDK's `parse` with a Pydantic model: the real model, masked to the schema, answers
    in it, and the answer is still the model's (the capital it knows)."""
    chat = smollm2.chat.completions.parse(
        model="smollm2", messages=[{"role": "user", "content": "Describe the capital of France as JSON."}],
        response_format=City, max_tokens=60, temperature=0)
    city = chat.choices[0].message.parsed
    assert chat.choices[0].finish_reason == "stop"
    assert city.name == "Paris" and city.country.lower() == "france" and city.is_capital, city
