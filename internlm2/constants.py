"""Constants that several layers of the package share, defined once."""

import torch

# The label of a token that has no target (the last token of each packed document, masked chat turns,
# padding). Also PyTorch's own default for `F.cross_entropy`, so plain-PyTorch oracles agree.
IGNORE_INDEX = -100

# dtype names as configs, CLIs and HF `torch_dtype` fields spell them.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
