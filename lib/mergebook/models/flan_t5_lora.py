"""Flan-T5 with peft LoRA adapters on eight GLUE tasks: the Concrete paper's language setting (Tables 4-5, 8-9).

The checkpoints are ``google/flan-t5-base`` (or ``-large``) and the adapters
``tanganke/flan-t5-<size>_glue-<task>_lora-16``, as listed in FusionBench's
``config/modelpool/Seq2SeqLMPool/flan-t5-*_glue_lora16*.yaml``; the data is GLUE's validation split
(``validation_matched`` for MNLI). Each adapter is densified into a task vector ΔW = (α/r)·B·A on
its targeted modules (the Suite holds those weights only; every other weight stays pretrained in
the module), so every merge method of the book applies. Which merges could stay factored is said
in :mod:`mergebook.lora`.

Scoring is text-to-text with the prompts of the Concrete paper's Appendix D.1, taken verbatim from
FusionBench's ``glue_prompt_templates.py`` (the adapters were trained on them, typos included):

* ``"exact_match"`` (the paper's): greedy generation (at most 10 tokens), exact match with the label
  word; STS-B parses the generated number (0.0 when unparseable) and reports Spearman's ρ;
* ``"label_words"``: rank classification, the label word with the highest sequence log-likelihood.

For test-time adaptation the Suite's "features" are the first decoder step's logits at the first
token of each label word (0-dim heads: no normalisation), so AdaMerging's entropy is over the
label words' token distribution.

Offline: with ``HF_HUB_OFFLINE=1`` nothing is downloaded, and a missing checkpoint or dataset fails
at the start with one message listing every download needed. :func:`build_pico_t5` writes a tiny
random T5, adapters and datasets under those same ids, which the tests load through
``model_source`` / ``dataset_loader``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import lora
from .suite import Suite, TaskData

StateDict = dict[str, torch.Tensor]

GLUE_TASKS = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]
SPLITS = {t: ("validation_matched" if t == "mnli" else "validation") for t in GLUE_TASKS}
GLUE_DATASET = "nyu-mll/glue"

# FusionBench's glue_prompt_templates.py (the Concrete paper's Appendix D.1 shows the same prompts).
PROMPTS = {
    "cola": "Indicate if the following sentence is grammatically correct or not: \"{sentence}\". Answere 'acceptable' or 'unacceptable'.",
    "mnli": "Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: '{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
    "mrpc": "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? Answere with 'yes' or 'no'.",
    "qnli": "Given the context: '{sentence}', does the question '{question}' have an answer based on the information provided? Answer with 'yes' or 'no'.",
    "qqp": "Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or 'no'.",
    "rte": "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
    "sst2": "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
    "stsb": "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely different) to 5 (completely similar), rate the similarity.",
}
STSB_VALUES = [round(0.2 * i, 1) for i in range(26)]  # label words of STS-B: "0.0", "0.2", ..., "5.0"
LABEL_WORDS = {
    "cola": ["unacceptable", "acceptable"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "mrpc": ["no", "yes"],
    "qnli": ["yes", "no"],
    "qqp": ["no", "yes"],
    "rte": ["yes", "no"],
    "sst2": ["negative", "positive"],
    "stsb": [f"{v:.1f}" for v in STSB_VALUES],
}
PAD_LOGIT = -1e4  # label slots a task does not use: zero probability, finite (no 0·inf in the entropy)


def adapter_id(base_id: str, task: str) -> str:
    """``tanganke/flan-t5-base_glue-<task>_lora-16`` for ``google/flan-t5-base`` (FusionBench's ids)."""
    return f"tanganke/{base_id.split('/')[-1]}_glue-{task}_lora-16"


def prompt(task: str, row: Mapping[str, Any]) -> str:
    """The Appendix D.1 input text of one GLUE row."""
    return PROMPTS[task].format(**row)


def target(task: str, row: Mapping[str, Any]) -> str:
    """The target text: the label word (STS-B: the score with one decimal)."""
    return f"{float(row['label']):.1f}" if task == "stsb" else LABEL_WORDS[task][int(row["label"])]


def spearman_rho(pred: Sequence[float], gold: Sequence[float]) -> float:
    """Spearman's ρ: Pearson correlation of average ranks (ties share their mean rank)."""
    from scipy.stats import rankdata

    p, g = rankdata(np.asarray(pred, float)), rankdata(np.asarray(gold, float))
    if p.std() == 0 or g.std() == 0:
        return 0.0  # a constant prediction has no rank correlation (scipy would return nan)
    return float(np.corrcoef(p, g)[0, 1])


def parse_score(text: str) -> float:
    """A generated STS-B score as a float; 0.0 when it is not a number (as FusionBench scores it)."""
    try:
        return float(text)
    except ValueError:
        return 0.0


# ----------------------------------------------------------------------------------------------
# Locating checkpoints and data (offline-aware)
# ----------------------------------------------------------------------------------------------


def hub_model_source(repo_id: str) -> Path:
    """A local snapshot of ``repo_id``; never downloads when ``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    return Path(snapshot_download(repo_id, local_files_only=offline))


def hub_dataset_loader(task: str, split: str) -> list[dict]:
    """GLUE rows of ``task``/``split`` through ``datasets`` (which honours ``HF_HUB_OFFLINE``)."""
    import datasets

    return [dict(r) for r in datasets.load_dataset(GLUE_DATASET, task, split=split)]


class MissingDownloads(FileNotFoundError):
    """Checkpoints or datasets that are not in the local cache (the message lists them)."""


def resolve_all(ids: Sequence[str], tasks: Sequence[str], model_source: Callable[[str], Path],
                dataset_loader: Callable[[str, str], list[dict]]) -> tuple[dict[str, Path], dict[str, list[dict]]]:
    """Every model directory and dataset split, or one :class:`MissingDownloads` naming all that is missing."""
    paths, data, missing = {}, {}, []
    for i in ids:
        try:
            paths[i] = Path(model_source(i))
        except Exception as e:  # LocalEntryNotFoundError, OfflineModeIsEnabled, KeyError, network errors
            missing.append(f"model {i}  ({type(e).__name__})")
    for t in tasks:
        try:
            data[t] = list(dataset_loader(t, SPLITS[t]))
        except Exception as e:
            missing.append(f"dataset {GLUE_DATASET} {t}/{SPLITS[t]}  ({type(e).__name__})")
    if missing:
        models = " ".join(i for i in ids if i not in paths)
        raise MissingDownloads(
            "the flan-t5 LoRA profile needs files that are not in the local Hugging Face cache:\n  "
            + "\n  ".join(missing)
            + "\nDownload them once with network access (unset HF_HUB_OFFLINE), e.g.\n"
            + (f"  huggingface-cli download {models.split()[0]}  (and likewise: {models})\n" if models else "")
            + f"  python -c \"import datasets; datasets.load_dataset('{GLUE_DATASET}', '<task>')\"\n"
            "then rerun; with HF_HUB_OFFLINE=1 nothing is ever downloaded."
        )
    return paths, data


# ----------------------------------------------------------------------------------------------
# The model: label-word logits of the first decoder step, with merged weights passed functionally
# ----------------------------------------------------------------------------------------------


class LabelWordScorer(nn.Module):
    """T5 whose output is the first decoder step's logits at each label word's first token.

    The input packs ``[N, 3, L]`` int64: input ids, attention mask, and the task's label-word first
    token ids (padded with -1) in the first slots of row 2, so one forward serves a batch that
    concatenates several tasks. Parameter names are those of ``T5ForConditionalGeneration``.
    """

    def __init__(self, t5: nn.Module, num_slots: int):
        super().__init__()
        self.shared, self.encoder, self.decoder, self.lm_head = t5.shared, t5.encoder, t5.decoder, t5.lm_head
        object.__setattr__(self, "_t5", t5)  # not a submodule: its parameters are the ones above
        self.num_slots = num_slots

    @property
    def t5(self) -> nn.Module:
        """The wrapped T5ForConditionalGeneration (same parameter objects)."""
        return self._t5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, num_slots] label-word logits (unused slots: :data:`PAD_LOGIT`)."""
        ids, mask, slots = x[:, 0], x[:, 1], x[:, 2, : self.num_slots]
        start = torch.full((ids.shape[0], 1), self._t5.config.decoder_start_token_id, dtype=ids.dtype, device=ids.device)
        logits = self._t5(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0]
        picked = logits.gather(1, slots.clamp_min(0))
        return torch.where(slots >= 0, picked, torch.full_like(picked, PAD_LOGIT))


def first_tokens(tok, words: Sequence[str]) -> list[int]:
    """Each label word's first target token (what the first decoder step must choose)."""
    return [tok(w, add_special_tokens=False)["input_ids"][0] for w in words]


def pack_inputs(tok, texts: Sequence[str], slots: Sequence[int], max_length: int, num_slots: int) -> torch.Tensor:
    """``[N, 3, max_length]`` int64 for :class:`LabelWordScorer`."""
    if len(slots) > min(num_slots, max_length):
        raise ValueError(f"{len(slots)} label words do not fit {num_slots} slots / max_length {max_length}")
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    row = torch.full((len(texts), max_length), -1, dtype=torch.long)
    row[:, : len(slots)] = torch.tensor(slots, dtype=torch.long)
    return torch.stack([enc["input_ids"], enc["attention_mask"], row], 1)


@contextlib.contextmanager
def weights_loaded(module: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Temporarily copy ``state_dict`` into ``module``'s parameters (for ``generate``), then restore."""
    params = dict(module.named_parameters())
    unknown = [k for k in state_dict if k not in params]
    if unknown:
        raise KeyError(f"keys not in the model: {unknown[:3]}")
    saved = {k: params[k].detach().clone() for k in state_dict}
    try:
        with torch.no_grad():
            for k, v in state_dict.items():
                params[k].copy_(v)
        yield module
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)


@torch.no_grad()
def label_word_scores(t5: nn.Module, tok, texts: Sequence[str], words: Sequence[str], max_length: int = 512,
                      batch_size: int = 32) -> torch.Tensor:
    """[N, C] sequence log-likelihood log p(word | text) of every label word (rank classification)."""
    t5.eval()
    dev = next(t5.parameters()).device
    tgt = tok(list(words), padding=True, return_tensors="pt")
    labels = tgt["input_ids"].to(dev)
    labels = labels.masked_fill(tgt["attention_mask"].to(dev) == 0, -100)
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt").to(dev)
        n, c = enc["input_ids"].shape[0], labels.shape[0]
        enc_out = t5.encoder(**enc).last_hidden_state
        rep = lambda t: t.repeat_interleave(c, 0)  # noqa: E731  (every text with every word)
        lab = labels.repeat(n, 1)
        logits = t5(encoder_outputs=(rep(enc_out),), attention_mask=rep(enc["attention_mask"]), labels=lab).logits
        logp = logits.log_softmax(-1).gather(-1, lab.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        out.append((logp * (lab != -100)).sum(-1).view(n, c))
    return torch.cat(out).cpu()


@torch.no_grad()
def generate_texts(t5: nn.Module, tok, texts: Sequence[str], max_length: int = 512, batch_size: int = 32,
                   max_new: int = 10) -> list[str]:
    """Greedy generations (at most ``max_new`` tokens), special tokens removed."""
    t5.eval()
    dev = next(t5.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt").to(dev)
        ids = t5.generate(**enc, max_length=max_new, do_sample=False, num_beams=1)
        out += [s.strip() for s in tok.batch_decode(ids, skip_special_tokens=True)]
    return out


def score_task(task: str, predictions: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> float:
    """The paper's metric in percent: exact-match accuracy, or 100·Spearman ρ for STS-B."""
    if task == "stsb":
        return 100.0 * spearman_rho([parse_score(p) for p in predictions], [float(r["label"]) for r in rows])
    gold = [target(task, r) for r in rows]
    return 100.0 * float(np.mean([p == g for p, g in zip(predictions, gold)]))


def evaluate_glue(suite: Suite, state_dict: Mapping[str, torch.Tensor], tasks: Sequence[str] | None = None,
                  scoring: str = "exact_match", batch_size: int = 32) -> dict[str, float]:
    """Per-task metric (%) of merged weights, plus ``avg``, on the suite's GLUE rows (the paper's tables)."""
    if scoring not in ("exact_match", "label_words"):
        raise ValueError(f"scoring must be 'exact_match' (the paper's) or 'label_words', got {scoring!r}")
    tasks = list(tasks or suite.tasks)
    t5, tok, max_length = suite.model.t5, suite.meta["tokenizer"], suite.meta["max_length"]
    res = {}
    with weights_loaded(t5, state_dict):
        for t in tasks:
            rows = suite.meta["rows"][t]
            texts = [prompt(t, r) for r in rows]
            if scoring == "exact_match":
                preds = generate_texts(t5, tok, texts, max_length, batch_size)
            else:
                best = label_word_scores(t5, tok, texts, LABEL_WORDS[t], max_length, batch_size).argmax(1)
                preds = [LABEL_WORDS[t][i] for i in best.tolist()]
            res[t] = score_task(t, preds, rows)
    res["avg"] = sum(res[t] for t in tasks) / len(tasks)
    return res


# ----------------------------------------------------------------------------------------------
# The Suite
# ----------------------------------------------------------------------------------------------


def load_suite(
    base_id: str = "google/flan-t5-base",
    tasks: Sequence[str] = GLUE_TASKS,
    *,
    n_test: int | None = None,
    n_val: int = 0,
    max_length: int = 256,
    seed: int = 0,
    device: str = "cpu",
    model_source: Callable[[str], str | Path] | None = None,
    dataset_loader: Callable[[str, str], list[dict]] | None = None,
    adapter_ids: Mapping[str, str] | None = None,
    profile: str = "flan-t5-base-lora",
    progress: bool = True,
) -> Suite:
    """Flan-T5 + one densified LoRA task vector per GLUE task, label-word heads and validation rows.

    ``n_test``: at most this many rows per task (seeded subset; None: all). ``n_val`` rows are
    held out of them for choosing λ. ``model_source(id) -> dir`` and ``dataset_loader(task, split)
    -> rows`` replace the hub (tests pass :func:`build_pico_t5`'s).
    """
    lora.hide_broken_torchvision()
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    unknown = [t for t in tasks if t not in GLUE_TASKS]
    if unknown:
        raise ValueError(f"unknown GLUE tasks {unknown}; known: {', '.join(GLUE_TASKS)}")
    ids = {t: (adapter_ids or {}).get(t, adapter_id(base_id, t)) for t in tasks}
    paths, rows_all = resolve_all([base_id, *ids.values()], tasks, model_source or hub_model_source,
                                  dataset_loader or hub_dataset_loader)
    tok = AutoTokenizer.from_pretrained(str(paths[base_id]))
    t5 = T5ForConditionalGeneration.from_pretrained(str(paths[base_id])).to(device).eval()
    for p in t5.parameters():
        p.requires_grad_(False)
    base_sd = t5.state_dict()

    adapters = {t: lora.read_adapter(paths[ids[t]]) for t in tasks}
    for t, ad in adapters.items():
        ad.name = ids[t]
        lora.check_adapter(ad, base_sd, base_id)
    keys = sorted({k for ad in adapters.values() for k in ad.factors}, key=list(base_sd).index)
    pretrained = {k: base_sd[k].detach().clone() for k in keys}
    finetuned = {t: lora.apply_adapter(pretrained, ad, keys) for t, ad in adapters.items()}

    num_slots = max(len(LABEL_WORDS[t]) for t in tasks)
    rng = np.random.default_rng(seed)
    test, val, heads, rows_kept, classes = {}, {}, {}, {}, {}
    for t in tasks:
        rows = rows_all[t]
        order = rng.permutation(len(rows))
        if n_test is not None:
            order = order[: n_test + n_val]
        picked = [rows[i] for i in order]
        slots = first_tokens(tok, LABEL_WORDS[t])
        if len(set(slots)) < len(slots) and t != "stsb":
            raise ValueError(f"{t}: label words {LABEL_WORDS[t]} share a first token in this tokenizer")
        if t == "stsb":
            labels = [int(np.abs(np.array(STSB_VALUES) - float(r["label"])).argmin()) for r in picked]
        else:
            labels = [int(r["label"]) for r in picked]
        x = pack_inputs(tok, [prompt(t, r) for r in picked], slots, max_length, num_slots)
        y = torch.tensor(labels, dtype=torch.long)
        val[t] = TaskData(x[:n_val], y[:n_val])
        test[t] = TaskData(x[n_val:], y[n_val:])
        rows_kept[t] = picked[n_val:]
        heads[t] = torch.tensor(1.0)
        classes[t] = list(LABEL_WORDS[t])
    return Suite(
        profile=profile, tasks=list(tasks), model=LabelWordScorer(t5, num_slots), pretrained=pretrained,
        finetuned=finetuned, heads=heads, test=test, val={t: v for t, v in val.items() if len(v)},
        class_names=classes,
        meta={"tokenizer": tok, "rows": rows_kept, "adapters": adapters, "max_length": max_length,
              "base_id": base_id, "adapter_ids": ids,
              "fingerprint": json.dumps({"base": base_id, "ids": ids, "n_test": n_test, "n_val": n_val,
                                         "seed": seed, "max_length": max_length}, sort_keys=True)},
    )


# ----------------------------------------------------------------------------------------------
# A local pico snapshot (tests, and the hub-pico profile)
# ----------------------------------------------------------------------------------------------

PICO_BASE = "google/flan-t5-base"


def _pico_rows(task: str, n: int, rng: np.random.Generator) -> list[dict]:
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "home", "red", "blue"]
    fields = {"cola": ["sentence"], "sst2": ["sentence"], "mnli": ["premise", "hypothesis"],
              "qnli": ["question", "sentence"], "qqp": ["question1", "question2"]}.get(task, ["sentence1", "sentence2"])
    rows = []
    for i in range(n):
        row = {f: " ".join(rng.choice(words, 5)) for f in fields}
        row["label"] = float(rng.integers(0, 26)) / 5 if task == "stsb" else int(rng.integers(len(LABEL_WORDS[task])))
        row["idx"] = i
        rows.append(row)
    return rows


def build_pico_t5(root: str | Path, tasks: Sequence[str] = GLUE_TASKS, n_rows: int = 12, seed: int = 0,
                  rank: int = 4, base_id: str = PICO_BASE) -> tuple[Callable[[str], Path], Callable[[str, str], list[dict]]]:
    """Write a tiny random T5 (as ``base_id``), one peft LoRA adapter per task and GLUE-shaped rows.

    Returns ``(model_source, dataset_loader)`` resolving the real ids to the local snapshot, for
    :func:`load_suite`. Deterministic under ``seed``; nothing touches the network.
    """
    lora.hide_broken_torchvision()
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    root = Path(root)
    vocab = ["<pad>", "</s>", "<unk>"]
    for w in [w for t in tasks for w in LABEL_WORDS[t]] + sorted({w for p in PROMPTS.values() for w in p.split()}):
        if w not in vocab:
            vocab.append(w)
    for w in ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "home", "red", "blue"]:
        if w not in vocab:
            vocab.append(w)
    base_dir = root / base_id
    base_dir.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import processors

    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(base_dir))
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(vocab), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                   num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    t5 = T5ForConditionalGeneration(cfg).eval()
    t5.save_pretrained(str(base_dir), safe_serialization=True)
    adapters: dict[str, Path] = {}
    for i, t in enumerate(tasks):
        torch.manual_seed(seed + 1 + i)
        base = T5ForConditionalGeneration.from_pretrained(str(base_dir))
        pm = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q", "v"],
                                             lora_dropout=0.0, task_type="SEQ_2_SEQ_LM"))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:  # peft starts B at zero; a trained adapter is not
                    p.normal_(0.0, 0.2)
        d = root / adapter_id(base_id, t)
        pm.save_pretrained(str(d), safe_serialization=True)
        conf = json.loads((d / "adapter_config.json").read_text())
        conf["base_model_name_or_path"] = base_id
        (d / "adapter_config.json").write_text(json.dumps(conf, indent=1))
        adapters[adapter_id(base_id, t)] = d
    rng = np.random.default_rng(seed)
    data = {t: _pico_rows(t, n_rows, rng) for t in tasks}
    (root / "glue.json").write_text(json.dumps(data))
    models_ = {base_id: base_dir, **adapters}

    def model_source(repo_id: str) -> Path:
        if repo_id not in models_:
            raise KeyError(f"the pico T5 snapshot has no {repo_id!r}; it holds {sorted(models_)}")
        return models_[repo_id]

    def dataset_loader(task: str, split: str) -> list[dict]:
        if split != SPLITS[task]:
            raise KeyError(f"the pico snapshot holds only GLUE's {SPLITS[task]} split of {task}")
        return json.loads((root / "glue.json").read_text())[task]

    return model_source, dataset_loader
