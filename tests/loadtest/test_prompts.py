"""Prompts of an exact token length, with a real tokenizer and with one that merges at the seams."""

import asyncio

import pytest

from loadtest.prompts import LocalTokenizer, build_prompts


class MergingTokenizer:
    """Characters, greedy longest match over a few bigrams, and a BOS: a round trip may merge tokens."""

    BOS = 0

    def __init__(self):
        self.pieces = [None] + [chr(c) for c in range(32, 127)] + ["th", "he", "in", "er", "an", " t"]
        self.ids = {piece: index for index, piece in enumerate(self.pieces) if piece}

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, position = [self.BOS] if add_special_tokens else [], 0
        while position < len(text):
            piece = text[position:position + 2] if text[position:position + 2] in self.ids else text[position]
            ids.append(self.ids[piece])
            position += len(piece)
        return ids

    async def decode(self, token_ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in token_ids if i != self.BOS)


def test_prompts_round_trip_to_the_exact_length_through_merges():
    tokenizer = MergingTokenizer()
    lengths = [2, 3, 10, 57, 300]
    prompts = asyncio.run(build_prompts(tokenizer, lengths, seed=0))
    assert [len(asyncio.run(tokenizer.encode(p))) for p in prompts] == lengths


def test_prompts_are_seeded():
    tokenizer = MergingTokenizer()
    first = asyncio.run(build_prompts(tokenizer, [20, 30], seed=4))
    assert asyncio.run(build_prompts(tokenizer, [20, 30], seed=4)) == first
    assert asyncio.run(build_prompts(tokenizer, [20], seed=4)) != asyncio.run(build_prompts(tokenizer, [20], seed=5))


def test_an_impossible_length_is_an_error():
    with pytest.raises(ValueError, match="exactly 1 tokens"):
        asyncio.run(build_prompts(MergingTokenizer(), [1], seed=0))  # the BOS alone is one token


def test_smollm2_prompts_have_the_exact_length(smollm2_path):
    tokenizer = LocalTokenizer(str(smollm2_path))
    lengths = [1, 2, 16, 129, 1500]
    prompts = asyncio.run(build_prompts(tokenizer, lengths, seed=0))
    assert [len(tokenizer.tokenizer.encode(p)) for p in prompts] == lengths
