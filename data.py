"""Prepared training data on disk: tokenized shards read through memory maps (`PackedData`, written by
prepare.py) and the target's hidden states captured once (`HiddenStateCache`); DESIGN.md section 5."""
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from checkpoint import InputError, read_json, replace_atomically, write_json


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
    names the layers, of which a draft reads any subset."""

    def __init__(self, folder, data: PackedData, layer_ids, dtype: torch.dtype):
        self.folder, self.data, self.dtype = Path(folder), data, dtype
        meta = read_json(self.folder / "hidden.json", f"delete {folder} to capture again")
        dtype_name = str(dtype).removeprefix("torch.")
        if not set(layer_ids) <= set(meta["target_layer_ids"]) or meta["dtype"] != dtype_name:
            raise InputError(f"--hidden_cache {str(folder)!r} holds target layers {meta['target_layer_ids']} "
                             f"in {meta['dtype']}; this draft reads layers {list(layer_ids)} in "
                             f"{dtype_name}: use another --hidden_cache folder")
        self.columns = [meta["target_layer_ids"].index(i) for i in layer_ids]
        self.shards = []
        for shard in data.index["shards"]:
            path = self.folder / f"{shard['name']}.hidden.npy"
            try:
                self.shards.append(np.load(path, mmap_mode="r") if shard["samples"] else None)
            except (OSError, ValueError, EOFError):
                raise InputError(f"{path} is missing or corrupt: delete it, and train.py captures it "
                                 f"again") from None

    @staticmethod
    def capture(folder, data: PackedData, target, layer_ids, can_write: bool, log):
        """Capture the missing shards, one file each, so an interrupted run continues. A new cache holds
        layer_ids; an existing one keeps its layers."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        dtype = target.embed_tokens.weight.dtype
        meta = {"target_layer_ids": list(layer_ids), "dtype": str(dtype).removeprefix("torch."),
                "data": data.index["settings"]}
        if (folder / "hidden.json").is_file():  # the first run's layers stay (__init__ checks the subset)
            before = read_json(folder / "hidden.json", f"delete {folder} to capture again")
            if before["data"] != meta["data"]:
                raise InputError(f"--hidden_cache {str(folder)!r} was captured from other data: use another "
                                 f"folder, or delete it to capture again")
            meta = before
        else:
            write_json(folder / "hidden.json", meta)
        device = target.embed_tokens.weight.device
        todo = [(k, s) for k, s in enumerate(data.index["shards"])
                if s["samples"] and not (folder / f"{s['name']}.hidden.npy").is_file()]
        if todo and not can_write:
            raise InputError(f"--hidden_cache {str(folder)!r} is not complete: capture it with one process "
                             f"first (the same command without torchrun)")
        for k, shard in todo:
            start = int(data.starts[k])
            progress = Progress(f"capturing the target's hidden states, {shard['name']}", shard["samples"])
            rows = []
            for j in range(shard["samples"]):
                tokens = torch.from_numpy(data[start + j][0])[None].to(device)
                with torch.no_grad():
                    rows.append(target.hidden_states(tokens, meta["target_layer_ids"])[0].cpu())  # [S, T, H]
                progress(j + 1)
            states = torch.cat(rows)
            save_npy(folder / f"{shard['name']}.hidden.npy",
                     (states.view(torch.uint16) if dtype == torch.bfloat16 else states).numpy())
        if todo:
            log(f"captured the target's hidden states of {len(todo)} shards in {folder}")

    def get(self, i) -> torch.Tensor:
        """Sample i's hidden states [S, T, H] of the draft's layers."""
        shard, start, end = self.data.locate(i)
        rows = torch.from_numpy(np.array(self.shards[shard][start:end]))  # a copy: the map is read-only
        return (rows.view(torch.bfloat16) if self.dtype == torch.bfloat16 else rows)[:, self.columns]

