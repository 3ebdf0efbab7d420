"""SFT's loss on the engine is exact however the conversations are laid out: packed whole into rows
(best-fit) or padded one per row, in one micro-batch of 8 rows or 8 micro-batches of one, and under data,
tensor+sequence, context and interleaved pipeline parallelism, for both normalisations (the global mean
over trained tokens, and the mean over conversations of each conversation's mean). The oracle is one
plain-PyTorch model run on each conversation alone, F.cross_entropy over its trained tokens, in float64."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from internlm2.constants import IGNORE_INDEX
from internlm2.data import collate_packed
from internlm2.data.conversation_packing import ConversationPackedDataset
from internlm2.data.packing import pad_pieces
from internlm2.model import InternLM2ForCausalLM
from internlm2.parallel import ParallelConfig, ParallelState
from internlm2.train.sft import SFTOptions, SFTTask
from tests.distributed.spawn import run_distributed, worker_state
from tests.distributed.training_harness import _full, engine_with_initial_weights, initial_weights, tiny_config

TOL = dict(rtol=1e-5, atol=1e-6)
SEQ_LEN, ROWS = 48, 8


class InMemoryChat:
    """Stands in for a chat `PreparedDataset`: conversations (token ids) and their training masks."""

    has_mask, path, tokenizer_fingerprint = True, "<memory>", "test"

    def __init__(self, conversations):
        self.conversations = conversations

    def document_lengths(self):
        return np.array([len(ids) for ids, _ in self.conversations])

    def document(self, i):
        ids, mask = self.conversations[i]
        return np.array(ids, dtype=np.uint16), np.array(mask, dtype=np.uint8)

    def where(self, i):
        return f"conversation {i}"


def random_conversation(rng: random.Random, vocab: int):
    """Ids with one or two assistant turns: the mask marks their tokens."""
    ids = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(6, 30))]
    mask = [0] * len(ids)
    for _ in range(rng.randint(1, 2)):
        start = rng.randrange(2, len(ids) - 1)
        for t in range(start, min(len(ids), start + rng.randint(1, 6))):
            mask[t] = 1
    return ids, mask


def conversations():
    """Conversations that best-fit packs into exactly ROWS rows of SEQ_LEN (the first seed that does)."""
    vocab = tiny_config().vocab_size
    for seed in range(1000):
        rng = random.Random(seed)
        chat = [random_conversation(rng, vocab) for _ in range(22)]
        if len(ConversationPackedDataset(InMemoryChat(chat), SEQ_LEN, pad_id=0, packing="best_fit")) == ROWS:
            return chat
    raise AssertionError("no seed packs into ROWS rows")


def oracle(normalization: str):
    config = tiny_config()
    model = InternLM2ForCausalLM(config)
    model.load_state_dict(initial_weights(config))
    per_conversation, total, targets = [], 0.0, 0
    for ids, mask in conversations():
        ids = torch.tensor(ids)
        labels = torch.where(torch.tensor(mask[1:] + [0], dtype=torch.bool), torch.roll(ids, -1), IGNORE_INDEX)
        labels[-1] = IGNORE_INDEX
        logits = model(ids, cu_seqlens=torch.tensor([0, len(ids)], dtype=torch.int32)).logits
        nll = F.cross_entropy(logits.double(), labels, reduction="sum", ignore_index=IGNORE_INDEX)
        n = int((labels != IGNORE_INDEX).sum())
        per_conversation.append(nll / n)
        total, targets = total + nll, targets + n
    loss = total / targets if normalization == "token" else torch.stack(per_conversation).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def micro_batches(layout: str, rows_per_micro_batch: int) -> list[dict]:
    """The conversations as the engine's micro-batches: packed rows (collated), or padded `[B, S]`."""
    if layout == "packed":
        rows = ConversationPackedDataset(InMemoryChat(conversations()), SEQ_LEN, pad_id=0, packing="best_fit")
        return [collate_packed([rows[i] for i in range(s, s + rows_per_micro_batch)])
                for s in range(0, ROWS, rows_per_micro_batch)]
    chat = conversations()
    ids = torch.zeros(len(chat), SEQ_LEN, dtype=torch.long)
    labels = torch.full((len(chat), SEQ_LEN), IGNORE_INDEX)
    attention = torch.zeros(len(chat), SEQ_LEN, dtype=torch.long)
    for r, (tokens, mask) in enumerate(chat):
        n = len(tokens)
        ids[r, :n], attention[r, :n] = torch.tensor(tokens), 1
        labels[r, :n - 1] = torch.where(torch.tensor(mask[1:], dtype=torch.bool), torch.tensor(tokens[1:]),
                                        IGNORE_INDEX)
    step = len(chat) // 2
    return [{"input_ids": ids[s:s + step], "attention_mask": attention[s:s + step], "labels": labels[s:s + step]}
            for s in range(0, len(chat), step)]


def engine_step(parallel: ParallelState, normalization: str, layout: str = "packed", rows_per_micro_batch: int = 2):
    engine = engine_with_initial_weights(parallel)
    task = SFTTask(SFTOptions(loss_normalization=normalization))
    mbs = micro_batches(layout, rows_per_micro_batch)
    if parallel.cp_size > 1:  # as the trainer prepares them: pieces split into 2*cp chunks
        multiple = 2 * parallel.cp_size
        mbs = [pad_pieces(mb, multiple, multiple * (parallel.tp_size if parallel.sequence_parallel else 1), 0)
               for mb in mbs]
    per_rank = len(mbs) // parallel.dp_size
    mine = mbs[parallel.dp_rank * per_rank:(parallel.dp_rank + 1) * per_rank]
    metrics = engine.forward_backward(mine, task.loss, task.normalizer(mine))
    grads = _full(engine.optimizer.full_grads(), engine.chunks, parallel)
    engine.optimizer.remove_hooks()
    return {"loss": metrics["loss"], "grads": grads}


def check(results: list[dict], normalization: str) -> None:
    loss, grads = oracle(normalization)
    for r in results:
        assert abs(r["loss"] - loss) < 1e-5, (r["loss"], loss)
        for name, g in r["grads"].items():
            torch.testing.assert_close(g, grads[name], **TOL, msg=lambda m, n=name: f"grad {n}: {m}")
    assert set().union(*(r["grads"] for r in results)) == set(grads)


@pytest.mark.parametrize("normalization", ["token", "conversation"])
@pytest.mark.parametrize("layout,rows_per_micro_batch", [("packed", 8), ("packed", 1), ("padded", None)],
                         ids=["packed-batch8", "packed-batch1-accumulate8", "padded"])
def test_sft_loss_equals_conversations_one_by_one(normalization, layout, rows_per_micro_batch):
    check([engine_step(ParallelState.single(), normalization, layout, rows_per_micro_batch)], normalization)


def _distributed_case(config: ParallelConfig, normalization: str):
    shape = tiny_config()
    parallel = worker_state(config, num_layers=shape.num_layers, num_attention_heads=shape.num_attention_heads,
                            num_kv_heads=shape.num_key_value_heads, vocab_size=shape.vocab_size)
    return engine_step(parallel, normalization)


@pytest.mark.parametrize("normalization", ["token", "conversation"])
@pytest.mark.parametrize("layout", [
    pytest.param(dict(dp=2), marks=pytest.mark.world_size(2), id="dp2"),
    pytest.param(dict(tp=2, sequence_parallel=True), marks=pytest.mark.world_size(2), id="tp2-sp"),
    pytest.param(dict(cp=2), marks=pytest.mark.world_size(2), id="cp2"),
    pytest.param(dict(pp=2, virtual_stages=2), marks=pytest.mark.world_size(2), id="pp2-v2"),
])
def test_sft_loss_under_parallel_layouts(layout, normalization):
    config = ParallelConfig(**layout)
    check(run_distributed(config.world_size, _distributed_case, config, normalization), normalization)
