"""Prepared training data on disk: tokenized shards read through memory maps (`PackedData`, written by
prepare.py) and the target's hidden states captured once (`HiddenStateCache`); DESIGN.md section 5."""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from checkpoint import InputError, read_json, replace_atomically, write_json
from loss import target_states


def save_npy(path: Path, array):
    """A .npy file, written whole or not at all."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would add .npy to a name
            np.save(f, array)

    replace_atomically(path, write)


def write_shard(folder: Path, name: str, samples: list, counts: dict) -> dict:
    offsets = np.zeros(len(samples) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(ids) for ids, _ in samples])
    empty = np.zeros(0, dtype=np.int64)
    save_npy(folder / f"{name}.tokens.npy",
             np.concatenate([empty] + [ids for ids, _ in samples]).astype(np.uint32))
    save_npy(folder / f"{name}.mask.npy",
             np.concatenate([empty] + [mask for _, mask in samples]).astype(np.uint8))
    save_npy(folder / f"{name}.offsets.npy", offsets)
    meta = {"name": name, "samples": len(samples), "tokens": int(offsets[-1]),
            "trained_tokens": int(sum(int(mask.sum()) for _, mask in samples)), **counts}
    write_json(folder / f"{name}.json", meta)  # last: marks the shard complete
    return meta


def output_folder(path) -> Path:
    """--out, checked before the run's work rather than at its first save, and not created: the folder, or
    the nearest existing one above it, must take a new file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} is a file: pass a folder")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise InputError(f"cannot write to --out {str(out)!r} ({e.strerror}): pass a folder you can write "
                         f"to") from None
    return out


class PackedData:
    """The samples of a prepared folder, read through memory maps: data[i] -> (token ids, loss mask)."""

    def __init__(self, folder):
        folder = Path(folder)
        if not (folder / "index.json").is_file():
            raise InputError(f"{str(folder)!r} has no index.json: prepare the data with prepare.py first "
                             f"(or finish an interrupted prepare.py run by starting it again)")
        self.index = read_json(folder / "index.json",
                               "delete it and run prepare.py again with the same flags")
        self.shards = []
        for shard in self.index["shards"]:
            self.shards.append([self.load(folder, shard["name"], kind)
                                for kind in ("tokens", "mask", "offsets")] if shard["samples"] else None)
        self.starts = np.cumsum([0] + [s["samples"] for s in self.index["shards"]])

    @staticmethod
    def load(folder: Path, name: str, kind: str):
        path = folder / f"{name}.{kind}.npy"
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError, EOFError):  # missing, cut short (header or data), or not .npy at all
            raise InputError(f"shard file {path} is missing, truncated or corrupt: delete "
                             f"{folder / name}.json and run prepare.py again with the same flags to write "
                             f"that shard again") from None

    def __len__(self):
        return int(self.starts[-1])

    def locate(self, i):
        """Sample i's shard and its token range there: (shard index, start, end)."""
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        offsets = self.shards[shard][2]
        j = i - self.starts[shard]
        return shard, int(offsets[j]), int(offsets[j + 1])

    def __getitem__(self, i):
        shard, start, end = self.locate(i)
        tokens, mask, _ = self.shards[shard]
        return np.asarray(tokens[start:end], dtype=np.int64), np.asarray(mask[start:end])


class Progress:
    """A progress line on stderr: count, rate, time left."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int):
        now = time.perf_counter()
        if now - self.last < 0.5 and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        left = (self.total - done) / rate if rate > 0 else 0.0
        bar = "#" * int(20 * done / max(self.total, 1))
        end = "\n" if done >= self.total else ""
        print(f"\r{self.label} [{bar:<20}] {done}/{self.total} {rate:.1f}/s, {left:.0f} s left ", end=end,
              file=sys.stderr, flush=True)


class HiddenStateCache:
    """The target's hidden states of a prepared folder, captured once rather than at every step:
    NAME.hidden.npy per shard NAME, [tokens, T, H] in the target's dtype (bf16 as uint16 bits); hidden.json
    names the layers, of which a draft reads any subset. For --loss kl / lk also the target's top_k next
    tokens at every position: NAME.top_ids.npy [tokens, K] int32 and NAME.top_logits.npy fp32, of which a run
    reads the first (most likely) top_k <= K."""

    def __init__(self, folder, data: PackedData, layer_ids, dtype: torch.dtype, top_k: int = 0):
        self.folder, self.data, self.dtype, self.top_k = Path(folder), data, dtype, top_k
        meta = read_json(self.folder / "hidden.json", f"delete {folder} to capture again")
        dtype_name = str(dtype).removeprefix("torch.")
        if not set(layer_ids) <= set(meta["target_layer_ids"]) or meta["dtype"] != dtype_name:
            raise InputError(f"--hidden_cache {str(folder)!r} holds target layers {meta['target_layer_ids']} "
                             f"in {meta['dtype']}; this draft reads layers {list(layer_ids)} in "
                             f"{dtype_name}: use another --hidden_cache folder")
        self.columns = [meta["target_layer_ids"].index(i) for i in layer_ids]
        self.shards = []
        for shard in data.index["shards"]:
            kinds = ["hidden"] + ["top_ids", "top_logits"] * bool(top_k)
            self.shards.append([self.read(f"{shard['name']}.{kind}.npy") for kind in kinds]
                               if shard["samples"] else None)

    def read(self, name: str):
        try:
            return np.load(self.folder / name, mmap_mode="r")
        except (OSError, ValueError, EOFError):
            raise InputError(f"{self.folder / name} is missing or corrupt: delete it, and train.py captures "
                             f"it again") from None

    @staticmethod
    def capture(folder, data: PackedData, target, layer_ids, top_k: int, can_write: bool, log):
        """Capture the missing shard files, so an interrupted run continues. A new cache holds layer_ids; an
        existing one keeps its layers, and gains the top-K files when a run first needs them."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = target.embed_tokens.weight.dtype
        meta = {"target_layer_ids": list(layer_ids), "dtype": str(dtype).removeprefix("torch."),
                "data": data.index["settings"], "top_k": top_k}
        before = None
        if (folder / "hidden.json").is_file():  # the first run's layers stay (__init__ checks the subset)
            before = read_json(folder / "hidden.json", f"delete {folder} to capture again")
            if before["data"] != meta["data"]:
                raise InputError(f"--hidden_cache {str(folder)!r} was captured from other data: use another "
                                 f"folder, or delete it to capture again")
            if 0 < before.get("top_k", 0) < top_k:
                raise InputError(f"--hidden_cache {str(folder)!r} holds the target's top {before['top_k']} "
                                 f"tokens, fewer than --top_k {top_k}: lower --top_k, or use another folder")
            meta = {**before, "top_k": max(before.get("top_k", 0), top_k)}
        kinds = ["hidden"] + ["top_ids", "top_logits"] * bool(top_k)  # what this run reads
        todo = [(k, s) for k, s in enumerate(data.index["shards"])
                if s["samples"] and not all((folder / f"{s['name']}.{kind}.npy").is_file() for kind in kinds)]
        if todo and not can_write:
            raise InputError(f"--hidden_cache {str(folder)!r} is not complete: capture it with one process "
                             f"first (the same command without torchrun)")
        if can_write and meta != before:
            write_json(folder / "hidden.json", meta)
        for k, shard in todo:
            arrays = capture_shard(data, int(data.starts[k]), shard, target, meta["target_layer_ids"],
                                   meta["top_k"] if top_k else 0)
            for kind, array in zip(kinds, arrays):
                if not (folder / f"{shard['name']}.{kind}.npy").is_file():
                    save_npy(folder / f"{shard['name']}.{kind}.npy", array)
        if todo:
            top = f" and top {meta['top_k']} tokens" if top_k else ""
            log(f"captured the target's hidden states{top} of {len(todo)} shards in {folder}")

    def get(self, i) -> tuple:
        """Sample i's hidden states [S, T, H] of the draft's layers, and its top-K (ids [S, K] int64, fp32
        logits [S, K]) or None."""
        shard, start, end = self.data.locate(i)
        rows = [torch.from_numpy(np.array(a[start:end])) for a in self.shards[shard]]  # maps are read-only
        hidden = (rows[0].view(torch.bfloat16) if self.dtype == torch.bfloat16 else rows[0])[:, self.columns]
        if not self.top_k:
            return hidden, None
        return hidden, (rows[1][:, :self.top_k].long(), rows[2][:, :self.top_k])


def capture_shard(data: PackedData, start: int, shard: dict, target, layer_ids, top_k: int) -> list:
    """One shard's hidden states [tokens, T, H] (bf16 as uint16 bits) and, with top_k, its top-K ids and
    logits [tokens, K], a sample at a time."""
    progress = Progress(f"capturing the target's hidden states, {shard['name']}", shard["samples"])
    parts = []
    for j in range(shard["samples"]):
        tokens = torch.from_numpy(data[start + j][0])[None].to(target.embed_tokens.weight.device)
        with torch.no_grad():
            hidden, top = target_states(target, tokens, layer_ids, top_k)
        parts.append([hidden[0].cpu()] + ([] if top is None else [top[0][0].int().cpu(), top[1][0].cpu()]))
        progress(j + 1)
    arrays = [torch.cat(column) for column in zip(*parts)]
    if arrays[0].dtype == torch.bfloat16:
        arrays[0] = arrays[0].view(torch.uint16)
    return [a.numpy() for a in arrays]
