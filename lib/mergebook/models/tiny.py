"""The ``tiny`` backend: the offline miniature as a :class:`~mergebook.models.suite.Suite`.

Pipeline (each stage cached under ``.cache/mergebook/tiny/`` by a hash of its config and code):

1. generate the eight tasks' train / prototype / test images (``mergebook.data.tiny_suite``);
2. load the committed pretrained encoder (the miniature's CLIP), checking its sha256;
3. build frozen zero-shot-like heads: per class, the normalised mean of the *pretrained*
   encoder's normalised embeddings of a few prototype images, times the pretraining logit scale
   (CLIP's heads are the same construction over text embeddings of prompt templates);
4. fully fine-tune the encoder on each task with its frozen head (AdamW, cosine schedule,
   gradient clipping, as task_vectors does);
5. train the *Traditional MTL* reference row jointly on all tasks.

Steps 4 and 5 take about six minutes on two CPU cores, so their results are committed too, like the
pretrained encoder (``assets/tiny_finetuned/``, with ``record.json``: the command, seeds, device,
torch version, sha256 and cache key of each file). A committed file is used only when its recorded
key equals the key the current code and config compute (the key hashes the config and the
generator/training sources) and its sha256 matches; otherwise the model is trained as before, so a
code change can never silently reuse stale weights. ``MERGEBOOK_RETRAIN=1`` ignores them. Paper
readers download fine-tuned checkpoints; miniature readers get them from the repository.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # console bars: tqdm.auto warns without ipywidgets in the book's kernels

from .. import artifacts
from ..data import render, tiny_suite
from ..evaluate import head_logits
from . import tiny_train
from .suite import Suite, TaskData
from ..artifacts import sha256_file
from .tiny_train import ASSET, ASSET_DIR, ASSET_RECORD, TINY_VIT, cosine_lr, random_shift, to_tensor
from .vit import ViTConfig, VisionTransformer

StateDict = dict[str, torch.Tensor]


FINETUNED_DIR = ASSET_DIR / "tiny_finetuned"
FINETUNED_RECORD = FINETUNED_DIR / "record.json"


def committed_weights(name: str, key: str, record_path=None) -> StateDict | None:
    """The committed fine-tuned weights ``name`` if recorded under exactly ``key`` and intact, else None."""
    import os

    from safetensors.torch import load_file

    record_path = FINETUNED_RECORD if record_path is None else record_path
    if os.environ.get("MERGEBOOK_RETRAIN") == "1" or not record_path.exists():
        return None
    entry = json.loads(record_path.read_text()).get("files", {}).get(name)
    if not entry or entry.get("key") != key:
        return None  # another config or code: train
    path = record_path.parent / entry["file"]
    if not path.exists() or sha256_file(path) != entry["sha256"]:
        print(f"mergebook: committed {path.name} is missing or does not match its recorded sha256; training it "
              "instead (restore it with `git checkout -- lib/mergebook/assets`)", flush=True)
        return None
    return load_file(str(path))


def export_finetuned(cfg: "TinyConfig | None" = None, out_dir=None, command: str = "") -> dict:
    """Write the cached fine-tuned and MTL weights of ``cfg`` as committed assets, with their record."""
    import platform
    import shutil

    cfg = cfg or TinyConfig()
    out = FINETUNED_DIR if out_dir is None else out_dir
    out.mkdir(parents=True, exist_ok=True)
    cache = artifacts.Cache("tiny")
    keys = suite_keys(cfg)
    files = {}
    for name, key in keys.items():
        src = cache.path(name, key, ".safetensors")
        if not src.exists():
            raise FileNotFoundError(f"{src} is not cached: run load_suite('tiny', with_mtl=True) first")
        dst = out / f"{name}.safetensors"
        shutil.copyfile(src, dst)
        files[name] = {"file": dst.name, "key": key, "sha256": sha256_file(dst)}
    record = {"command": command or "python -m mergebook.models.tiny export-finetuned (after "
                         "load_suite('tiny', with_mtl=True) trained them into the cache)",
              "config": cfg.to_dict(), "seeds": {"data_seed": cfg.data_seed, "ft_seed": cfg.ft_seed},
              "device": f"cpu ({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "files": files}
    artifacts.atomic_write(out / "record.json", lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))
    return record


@dataclass(frozen=True)
class TinyConfig:
    """Everything that defines the miniature after pretraining (hashed into cache keys)."""

    tasks: tuple[str, ...] = tuple(tiny_suite.TASKS)
    n_train: int = 2000
    n_test: int = 1000
    n_val: int = 200
    protos_per_class: int = 3
    data_seed: int = 0
    ft_steps: int = 400
    ft_batch: int = 64
    ft_lr: float = 3e-4
    ft_weight_decay: float = 0.1
    ft_warmup: int = 30
    ft_seed: int = 0
    mtl_steps: int = 600
    mtl_batch_per_task: int = 16
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-dict form for hashing and reporting."""
        return asdict(self)


class AssetError(RuntimeError):
    """The committed pretrained encoder is missing or does not match its recorded hash."""


def load_pretrained() -> tuple[StateDict, dict]:
    """The committed pretrained miniature encoder and its metadata, after checking its sha256."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not ASSET.exists() or not ASSET_RECORD.exists():
        raise AssetError(f"missing {ASSET} or its record {ASSET_RECORD}; restore them from git "
                         "(git checkout -- lib/mergebook/assets) or re-run "
                         "`python -m mergebook.models.tiny_train pretrain`")
    record = json.loads(ASSET_RECORD.read_text())
    digest = sha256_file(ASSET)
    if digest != record["sha256"]:
        raise AssetError(f"{ASSET.name} has sha256 {digest}, but its record says {record['sha256']}: the file "
                         "is corrupt or was replaced; restore it with `git checkout -- lib/mergebook/assets`")
    with safe_open(str(ASSET), "pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(ASSET)), meta


def encoder_config(meta: dict) -> ViTConfig:
    """The ViT config recorded in the asset's metadata."""
    return ViTConfig(**json.loads(meta["config"])) if "config" in meta else TINY_VIT


def _data_modules():
    return [render, tiny_suite]


def task_data(cfg: TinyConfig, cache: artifacts.Cache, progress: bool = True) -> dict[str, dict[str, tuple]]:
    """uint8 images and labels of every task's splits (cached; identical on every machine)."""
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    out: dict[str, dict[str, tuple]] = {}
    for task in tqdm(cfg.tasks, desc="tiny suite data", disable=not progress):
        sizes["proto"] = cfg.protos_per_class * tiny_suite.num_classes(task)
        key = artifacts.make_key({"task": task, "sizes": sizes, "seed": cfg.data_seed}, _data_modules())

        def build(task=task, sizes=dict(sizes)):
            d = {}
            for split, n in sizes.items():
                x, y = tiny_train.generate_parallel(task, split, n, seed=cfg.data_seed, desc=f"{task}/{split}")
                d[f"{split}.x"], d[f"{split}.y"] = torch.from_numpy(x), torch.from_numpy(y)
            return d

        t = cache.tensors(f"data-{task}", key, build)
        out[task] = {s: (t[f"{s}.x"].numpy(), t[f"{s}.y"]) for s in sizes}
    return out


@torch.no_grad()
def build_heads(model: VisionTransformer, pretrained: StateDict, data: dict, logit_scale: float,
                tasks: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Zero-shot-like heads: normalised class prototypes of the pretrained encoder x logit scale."""
    model.load_state_dict(pretrained)
    model.eval()
    heads = {}
    for task in tasks:
        x, y = data[task]["proto"]
        feats = F.normalize(model(to_tensor(x)), dim=-1)
        k = tiny_suite.num_classes(task)
        protos = torch.stack([F.normalize(feats[y == c].mean(0), dim=-1) for c in range(k)])
        heads[task] = (logit_scale * protos).contiguous()
    return heads


def _train(model: VisionTransformer, init: StateDict, batches, heads: list[torch.Tensor], steps: int,
           lr: float, weight_decay: float, warmup: int, desc: str, progress: bool) -> StateDict:
    """Full fine-tuning with frozen heads: AdamW, warm-up + cosine, grad-norm clip 1.0."""
    model.load_state_dict(init)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * cosine_lr(step, steps, warmup)
        loss = 0.0
        for (xb, yb), head in zip(next(batches), heads):
            loss = loss + F.cross_entropy(head_logits(model(xb), head), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batches(sets: list[tuple[np.ndarray, torch.Tensor]], batch: int, seed: int):
    """Endless fixed-seed shuffled mini-batches, one per dataset per step, with random shifts."""
    gen = torch.Generator().manual_seed(seed)
    xs = [to_tensor(x) for x, _ in sets]
    ys = [y for _, y in sets]
    perms = [torch.randperm(len(y), generator=gen) for y in ys]
    pos = [0] * len(sets)
    while True:
        out = []
        for i in range(len(sets)):
            if pos[i] + batch > len(ys[i]):
                perms[i], pos[i] = torch.randperm(len(ys[i]), generator=gen), 0
            idx = perms[i][pos[i] : pos[i] + batch]
            pos[i] += batch
            out.append((random_shift(xs[i][idx], 2, gen), ys[i][idx]))
        yield out


def _key_base(cfg: TinyConfig) -> tuple[dict, list]:
    asset_hash = json.loads(ASSET_RECORD.read_text())["sha256"]
    train_modules = [render, tiny_suite, tiny_train]
    return {"asset": asset_hash, **{k: v for k, v in cfg.to_dict().items() if k != "tasks"}}, train_modules


def suite_keys(cfg: TinyConfig) -> dict[str, str]:
    """Cache keys of the trained weights of ``cfg``: ``finetuned-<task>`` per task and ``mtl``."""
    base, mods = _key_base(cfg)
    keys = {f"finetuned-{t}": artifacts.make_key({**base, "task": t}, mods) for t in cfg.tasks}
    keys["mtl"] = artifacts.make_key({**base, "tasks": cfg.tasks, "mtl": True}, mods)
    return keys


def load_suite(cfg: TinyConfig | None = None, *, progress: bool = True, with_mtl: bool = False,
               cache: artifacts.Cache | None = None) -> Suite:
    """Build (or load from cache) the miniature Suite; ``with_mtl`` also trains the joint MTL model."""
    cfg = cfg or TinyConfig()
    cache = cache or artifacts.Cache("tiny")
    torch.manual_seed(cfg.ft_seed)
    pretrained, meta = load_pretrained()
    model = VisionTransformer(encoder_config(meta))
    # the heads' logit scale: the pretraining's learned one, unless the config fixes another
    logit_scale = float(cfg.extra.get("head_logit_scale", meta["logit_scale"]))
    data = task_data(cfg, cache, progress)
    base, train_modules = _key_base(cfg)
    heads = cache.tensors("heads", artifacts.make_key({**base, "tasks": cfg.tasks}, train_modules),
                          lambda: build_heads(model, pretrained, data, logit_scale, cfg.tasks))
    keys = suite_keys(cfg)
    finetuned = {}
    for i, task in enumerate(cfg.tasks):
        key = keys[f"finetuned-{task}"]
        finetuned[task] = cache.tensors(f"finetuned-{task}", key, lambda task=task, i=i, key=key: committed_weights(
            f"finetuned-{task}", key) or _train(
            model, pretrained, _batches([data[task]["train"]], cfg.ft_batch, cfg.ft_seed + i),
            [heads[task]], cfg.ft_steps, cfg.ft_lr, cfg.ft_weight_decay, cfg.ft_warmup,
            f"fine-tune {task}", progress))
    test = {t: TaskData(to_tensor(data[t]["test"][0]), data[t]["test"][1]) for t in cfg.tasks}
    val = {t: TaskData(to_tensor(data[t]["val"][0]), data[t]["val"][1]) for t in cfg.tasks}
    suite = Suite(profile="tiny", tasks=list(cfg.tasks), model=model, pretrained=pretrained,
                  finetuned=finetuned, heads=heads, test=test,
                  class_names={t: tiny_suite.class_names(t) for t in cfg.tasks},
                  val=val, meta={"config": cfg.to_dict(), "asset": meta, "logit_scale": logit_scale,
                                 "fingerprint": artifacts.make_key({**base, "tasks": cfg.tasks}, train_modules)})
    if with_mtl:
        key = keys["mtl"]
        suite.meta["mtl"] = cache.tensors("mtl", key, lambda: committed_weights("mtl", key) or _train(
            model, pretrained, _batches([data[t]["train"] for t in cfg.tasks], cfg.mtl_batch_per_task, cfg.ft_seed),
            [heads[t] for t in cfg.tasks], cfg.mtl_steps, cfg.ft_lr, cfg.ft_weight_decay, cfg.ft_warmup,
            "traditional MTL", progress))
    suite.meta["sample_images"] = {t: data[t]["test"][0][:64] for t in cfg.tasks}
    suite.meta["split_sizes"] = {t: {s: int(len(v[1])) for s, v in data[t].items()} for t in cfg.tasks}
    suite.meta["val_split"] = (f"{cfg.n_val} generated images per task, drawn apart from the train and test "
                               f"images (data seed {cfg.data_seed})")
    return suite


def main(argv: list[str] | None = None) -> None:
    """``python -m mergebook.models.tiny export-finetuned``: commit the cached fine-tunes as assets."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m mergebook.models.tiny")
    p.add_argument("cmd", choices=["export-finetuned"])
    args = p.parse_args(argv)
    load_suite(with_mtl=True)  # trains into the cache whatever is not there yet
    rec = export_finetuned(command="python -m mergebook.models.tiny export-finetuned")
    print(f"wrote {len(rec['files'])} files and record.json to {FINETUNED_DIR}")


if __name__ == "__main__":
    main()
