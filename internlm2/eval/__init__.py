"""Long-context evaluation of HF checkpoints: needle-in-a-haystack, passkey retrieval, and loss by token
position (`internlm2 eval TASK`), plus the passkey documents that teach retrieval in pretraining.

Shared pieces: `model_access` (the one place a checkpoint is loaded; greedy answers), `haystack`
(prompts of an exact token length with the needle at a depth), `retrieval` (the length x depth grid,
batched by length, scored and written as JSON + heatmap), `memory` (the estimate checked before a run),
`plots`.
"""

# `internlm2 eval TASK`: task -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "needle": ("internlm2.eval.needle", "needle in a haystack of real text over a length x depth grid"),
    "passkey": ("internlm2.eval.passkey", "passkey retrieval (a number hidden in repeated filler), same grid"),
    "perplexity": ("internlm2.eval.perplexity", "mean loss by token position over a prepared dataset's long documents"),
    "passkey-data": ("internlm2.eval.passkey_data", "write passkey documents as a prepared dataset to mix into training"),
}


class EvalError(ValueError):
    """Bad input to an evaluation (the message names the option or file)."""
