"""Re-derive the bundled samples from the shared real data (see PROVENANCE.md).

    MMM4REC_SHARED_DATA=<dir> python data/samples/derive.py

``scientific_mm/`` is a byte-for-byte copy of ``missrec_scientific_mm_subset/``.
``office/`` is a 5-core subset of ``lcrec_office_2014/`` (LC-Rec JSON, original ids
kept): the 400 most interacted items, every user's sequence restricted to them
(order kept), iterative 5-core, the first 1,500 users by id, iterative 5-core again.
``amazon_mix/<domain>/`` (not used by the quickstart yet): four Amazon domains of
``seqrec_benchmark/`` (RecBole atomic files, title-only items, real timestamps), each
derived as ``office``: the 150 most interacted items, sequences restricted to them
(time order kept), iterative 5-core, the first 400 users by id, iterative 5-core again.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP_ITEMS, USERS, K = 400, 1500, 5
MIX_DOMAINS = ("amazon2014-beauty", "amazon2014-toy", "amazon2014-health", "amazon2018-game")
MIX_TOP_ITEMS, MIX_USERS = 150, 400


def shared_dir() -> Path:
    return Path(os.environ.get("MMM4REC_SHARED_DATA", HERE.parents[1] / ".." / "shared" / "data")).resolve()


def k_core(seqs: dict[str, list[int]], k: int) -> dict[str, list[int]]:
    while True:
        count = Counter(i for s in seqs.values() for i in s)
        new = {u: [i for i in s if count[i] >= k] for u, s in seqs.items()}
        new = {u: s for u, s in new.items() if len(s) >= k}
        if new == seqs:
            return seqs
        seqs = new


def main() -> None:
    src = shared_dir()
    mm = HERE / "scientific_mm"
    mm.mkdir(exist_ok=True)
    for f in sorted((src / "missrec_scientific_mm_subset").iterdir()):
        shutil.copyfile(f, mm / f.name)

    office = src / "lcrec_office_2014"
    inter = json.loads((office / "Office.inter.json").read_text())
    items = json.loads((office / "Office.item.json").read_text())
    top = {i for i, _ in Counter(i for s in inter.values() for i in s).most_common(TOP_ITEMS)}
    seqs = k_core({u: [i for i in s if i in top] for u, s in inter.items()}, K)
    first = sorted(seqs, key=int)[:USERS]
    seqs = k_core({u: seqs[u] for u in first}, K)
    kept = sorted({i for s in seqs.values() for i in s})
    out = HERE / "office"
    out.mkdir(exist_ok=True)
    (out / "Office.inter.json").write_text(json.dumps(seqs, separators=(",", ":")) + "\n")
    (out / "Office.item.json").write_text(
        json.dumps({str(i): items[str(i)] for i in kept}, separators=(",", ":"), ensure_ascii=False) + "\n")
    print(f"office: {len(seqs)} users, {len(kept)} items, {sum(map(len, seqs.values()))} interactions")
    main_mix()



def derive_mix_domain(src: Path, out: Path) -> str:
    """One ``seqrec_benchmark`` domain -> a small RecBole atomic copy (rows copied verbatim)."""
    name = src.name
    inter = (src / f"{name}.inter").read_text(encoding="utf-8").splitlines()
    items = (src / f"{name}.item").read_text(encoding="utf-8").splitlines()
    rows: dict[str, list[tuple[str, str]]] = {}
    for line in inter[1:]:
        u, i, _ = line.split("\t")
        rows.setdefault(u, []).append((i, line))
    top = {i for i, _ in Counter(i for r in rows.values() for i, _ in r).most_common(MIX_TOP_ITEMS)}
    seqs = k_core({u: [i for i, _ in r if i in top] for u, r in rows.items()}, K)
    first = sorted(seqs, key=int)[:MIX_USERS]
    seqs = k_core({u: seqs[u] for u in first}, K)
    kept_items = {i for s in seqs.values() for i in s}
    out.mkdir(parents=True, exist_ok=True)
    lines = [line for u in sorted(seqs, key=int) for i, line in rows[u] if i in kept_items]
    (out / f"{name}.inter").write_text("\n".join([inter[0], *lines]) + "\n", encoding="utf-8")
    kept_rows = [x for x in items[1:] if x.split("\t", 1)[0] in kept_items]
    (out / f"{name}.item").write_text("\n".join([items[0], *kept_rows]) + "\n", encoding="utf-8")
    return f"{name}: {len(seqs)} users, {len(kept_items)} items, {len(lines)} interactions"


def main_mix() -> None:
    src = shared_dir() / "seqrec_benchmark"
    for d in MIX_DOMAINS:
        print(derive_mix_domain(src / d, HERE / "amazon_mix" / d))


if __name__ == "__main__":
    main()
