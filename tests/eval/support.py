"""Stand-in models behind the evaluations' answerer interface (prompts, max_new_tokens -> token ids)."""

import torch


def copying_answerer(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """A perfect induction head: finds the latest earlier occurrence of the longest suffix of the prompt
    (up to 16 tokens) that occurs before, and copies the tokens that followed it. It knows nothing of
    the key; it copies whatever the text says after the words the prompt ends with."""
    answers = []
    for prompt in prompts:
        answer = []
        for n in range(min(16, len(prompt) - 1), 0, -1):
            suffix = prompt[-n:]
            starts = [i for i in range(len(prompt) - n - 1, -1, -1) if prompt[i:i + n] == suffix]
            if starts:
                answer = prompt[starts[0] + n:starts[0] + n + max_new_tokens]
                break
        answers.append(answer)
    return answers


class RandomAnswerer:
    """Uniformly random tokens."""

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size, self.generator = vocab_size, torch.Generator().manual_seed(seed)

    def __call__(self, prompts, max_new_tokens):
        return torch.randint(0, self.vocab_size, (len(prompts), max_new_tokens), generator=self.generator).tolist()


class RecordingAnswerer:
    """Wraps an answerer and records the prompt lengths of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, prompts, max_new_tokens):
        self.calls.append([len(p) for p in prompts])
        return self.inner(prompts, max_new_tokens)
