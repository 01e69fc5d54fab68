"""Launched in two processes by test_sharded.py: what ``distributed.whole_weights`` sends a generation engine under
the launch's strategy (FSDP2 or ZeRO-3), with and without a cast to bfloat16, how many all-gathers it issued and
in which dtype, and the whole state dict gathered another way (``full_state_dict``), saved per process for the test
to compare: ``python push_weights.py OUT_DIR``."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from astarpo import distributed
from astarpo.distributed import full_state_dict, make_accelerator, whole_weights
from astarpo.launch import finish

out = Path(sys.argv[1])
acc = make_accelerator(micro_batch_size=1, max_grad_norm=1.0)
torch.manual_seed(0)
# 101 rows of embedding and LM head: FSDP2 splits them 51 + 50; the probe's one row leaves process 1 nothing
model = LlamaForCausalLM(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
model.model.register_parameter("probe", torch.nn.Parameter(torch.randn(1, 3)))
model, optimizer = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
ids = torch.randint(0, 101, (1, 8), generator=torch.Generator().manual_seed(acc.process_index))
acc.backward(model(input_ids=ids, labels=ids).loss)  # one update: the shards hold trained weights, not the initial
optimizer.step()
policy = acc.unwrap_model(model)

all_gather_into_tensor, gathered = dist.all_gather_into_tensor, []


def counted(output: torch.Tensor, *args, **kwargs):
    gathered.append(str(output.dtype))
    return all_gather_into_tensor(output, *args, **kwargs)


distributed.BUCKET_BYTES = 32 * 1024  # several buckets of the tiny model (about 100 KiB in float32)
runs = {}
dist.all_gather_into_tensor = counted
for dtype in (None, torch.bfloat16):
    gathered.clear()
    sent = [(name, tensor.cpu().clone()) for name, tensor in whole_weights(policy, dtype)]
    runs[str(dtype)] = {"names": [n for n, _ in sent], "tensors": dict(sent), "gathers": list(gathered)}
dist.all_gather_into_tensor = all_gather_into_tensor
torch.save({"runs": runs, "order": list(policy.state_dict()), "full": full_state_dict(acc, model)},
           out / f"rank{acc.process_index}.pt")
finish()
