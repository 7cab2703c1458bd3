"""Prompts of an exact token length, counted by the served model's tokenizer.

The tokenizer is a local Hugging Face folder (`--tokenizer`) or the server's own
`/tokenize` and `/detokenize` routes (iterserve has them, as do recent vLLM servers).
Token ids are drawn from a pool of ordinary word tokens, the tokenization of a fixed
list of English words, so the pool is the same whichever way the tokenizer is reached
and the same seed gives every server the same prompts. Decoding random ids and
tokenizing the text again may merge or split tokens at the seams, so the length is
checked after the round trip and corrected until it is exact.
"""

import random
from typing import Protocol

WORDS = """time year people way day man thing woman life child world school state family student group
country problem hand part place case week company system program question work government number night
point home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher force education
foot boy age policy music market sense nation plan college interest death experience effect class control
care field development role effort rate heart drug show leader light voice wife police mind price report
decision son view relationship town road arm difference value building action model season society tax
director position player record paper space ground form event official matter center couple site project
activity star table need court oil situation cost industry figure street image phone data picture practice
piece land product doctor wall patient worker news test movie north love support technology step baby
computer type attention film tree source organization hair window evidence population truth song river
garden bridge letter summer winter evening green blue quick bright quiet small large open
""".split()
MAX_ATTEMPTS = 16


class TokenizerUnavailable(RuntimeError):
    """Neither `--tokenizer` nor the server's /tokenize route can count tokens."""


class Tokenizer(Protocol):
    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    async def decode(self, token_ids: list[int]) -> str: ...


class LocalTokenizer:
    """A Hugging Face tokenizer loaded from a folder or hub id."""

    def __init__(self, name_or_path: str):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as error:
            raise TokenizerUnavailable(f"cannot load the tokenizer {name_or_path!r}: {error}") from None

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)


class ServerTokenizer:
    """The server's POST /tokenize and /detokenize, on the benchmark's own HTTP client."""

    def __init__(self, client, model: str):
        self.client, self.model = client, model

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
        return (await self._post("/tokenize", body))["tokens"]

    async def decode(self, token_ids: list[int]) -> str:
        return (await self._post("/detokenize", {"model": self.model, "tokens": token_ids}))["prompt"]

    async def _post(self, path: str, body: dict) -> dict:
        import httpx

        try:
            response = await self.client.post(path, json=body)
        except httpx.HTTPError as error:
            raise TokenizerUnavailable(self._advice(f"{path} failed: {error!r}")) from None
        if response.status_code != 200:
            raise TokenizerUnavailable(self._advice(f"{path} answered {response.status_code}: "
                                                    f"{response.text[:200]}"))
        return response.json()

    def _advice(self, problem: str) -> str:
        return (f"cannot count tokens with the server at {self.client.base_url} ({problem}); "
                "pass --tokenizer PATH, the served model's Hugging Face tokenizer folder or hub id")


async def ordinary_token_pool(tokenizer: Tokenizer) -> list[int]:
    pool = sorted(set(await tokenizer.encode(" " + " ".join(WORDS), add_special_tokens=False)))
    if len(pool) < 16:
        raise TokenizerUnavailable(f"the tokenizer turned {len(WORDS)} words into only {len(pool)} distinct tokens")
    return pool


async def exact_length_prompt(tokenizer: Tokenizer, pool: list[int], prompt_len: int, rng: random.Random,
                              num_special: int = 0) -> str:
    """Text that the tokenizer makes prompt_len tokens, counting the `num_special` tokens (a BOS,
    say) that it adds to every prompt, as the server will."""
    token_ids = rng.choices(pool, k=max(1, prompt_len - num_special))
    for _ in range(MAX_ATTEMPTS):
        text = await tokenizer.decode(token_ids)
        counted = len(await tokenizer.encode(text, add_special_tokens=True))
        if counted == prompt_len:
            return text
        # Continue from the round-tripped ids: they are a stable tokenization of the text.
        token_ids = await tokenizer.encode(text, add_special_tokens=False)
        if counted > prompt_len:
            token_ids = token_ids[:max(1, len(token_ids) - (counted - prompt_len))]
        else:
            token_ids += rng.choices(pool, k=prompt_len - counted)
    raise ValueError(f"could not build a prompt of exactly {prompt_len} tokens in {MAX_ATTEMPTS} attempts "
                     f"(the nearest was {counted})")


async def build_prompts(tokenizer: Tokenizer, prompt_lens: list[int], seed: int) -> list[str]:
    pool = await ordinary_token_pool(tokenizer)
    num_special = len(await tokenizer.encode("", add_special_tokens=True))
    rng = random.Random(seed)
    return [await exact_length_prompt(tokenizer, pool, prompt_len, rng, num_special) for prompt_len in prompt_lens]
