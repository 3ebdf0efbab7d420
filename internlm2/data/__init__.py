"""Data pipeline: tokenizer, corpus preparation, packed rows, resumable sampling, chat and RLHF data.

Pretraining data flow (each step usable on its own):

    tok = Tokenizer.load("tok/")                                  # or train_tokenizer(...)
    prepare(["corpus/"], tok, "prepared/")                        # `internlm2 prepare-data`
    rows = PackedDataset(PreparedDataset("prepared/", tok.fingerprint), seq_len=4096)
    mix = MixtureDataset([rows, other_rows], weights=[0.7, 0.3])  # optional
    sampler = ResumableSampler(len(mix), micro_batch_size=4, seed=0, dp_rank=r, dp_size=d,
                               consumed_samples=consumed)         # resume from the checkpoint's count
    loader = DataLoader(mix, batch_sampler=sampler, collate_fn=collate_packed, num_workers=1)

Each batch is one packed sequence: `input_ids`, `labels`, `position_ids` [B*T], `cu_seqlens` int32, and
`max_seqlen`. SFT data is prepared with `format="chat"` (ChatML, assistant-only loss) and packed whole-
conversation by `ConversationPackedDataset` (rows of the same form, so they mix with pretraining rows);
`PreferenceDataset` and `PromptDataset` serve the reward model and PPO.
"""

from internlm2.data.builtin_corpus import stdlib_files
from internlm2.data.chat import ChatFormatError, Message, check_order, parse_messages, render
from internlm2.data.conversation_packing import ConversationPackedDataset
from internlm2.data.errors import DataError
from internlm2.data.hf_tokenizer import hf_tokenizer_files
from internlm2.data.mixture import MixtureDataset
from internlm2.data.packing import IGNORE_INDEX, PackedDataset, collate_packed
from internlm2.data.preference import PreferenceDataset, PromptDataset
from internlm2.data.prepare import PrepareOptions, prepare
from internlm2.data.prepared import PreparedDataset
from internlm2.data.sampler import ResumableSampler, micro_batch_indices, sample_indices
from internlm2.data.tokenizer import CHAT_TOKENS, Tokenizer
from internlm2.data.tokenizer_training import train_tokenizer

__all__ = [
    "CHAT_TOKENS", "IGNORE_INDEX", "ChatFormatError", "ConversationPackedDataset", "DataError", "Message",
    "MixtureDataset", "PackedDataset",
    "PrepareOptions", "PreparedDataset", "PreferenceDataset", "PromptDataset", "ResumableSampler", "Tokenizer",
    "check_order", "collate_packed", "hf_tokenizer_files", "micro_batch_indices", "parse_messages", "prepare", "render",
    "sample_indices", "stdlib_files", "train_tokenizer",
]
