"""How long reading a GGUF encoder file's header takes: t5core's reader (the metadata, every tensor's info and the
tokenizer's fields, checked) against gguf.GGUFReader, on header-only files shaped like the real ones: T5 (the
bundled spiece.model's pieces padded to 32128, as llama.cpp writes them, with its charsmap) and UMT5 (256384
tokens). Each file also holds XXL's 219 tensor infos, with one byte of data each (the header is what is read).

    python benchmarks/gguf_header_time.py        # about 1 minute on 2 cores
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gguf
import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb

from t5core.gguf import _read_header, tokenizer_fields
from t5core.tokenizer import BUNDLED_SPIECE


def write(path: Path, rows: int) -> None:
    proto = sp_pb.ModelProto.FromString(BUNDLED_SPIECE.read_bytes())
    if rows == 32128:  # T5's pieces, then the unused '[PADn]' llama.cpp adds up to the embedding's rows
        tokens = [p.piece for p in proto.pieces]
        tokens += [f"[PAD{i}]" for i in range(1, rows - len(tokens) + 1)]
    else:
        tokens = [f"\u2581tok{i}" for i in range(rows)]
    w = gguf.GGUFWriter(str(path), "t5encoder")
    w.add_tokenizer_model("t5")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(rows)])
    w.add_token_types([1] * rows)
    w.add_precompiled_charsmap(proto.normalizer_spec.precompiled_charsmap)
    w.add_eos_token_id(1)
    w.add_unk_token_id(2)
    w.add_pad_token_id(0)
    names = ["token_embd.weight", "enc.output_norm.weight"] + [
        f"enc.blk.{i}.{t}.weight" for i in range(24) for t in
        ("attn_q", "attn_k", "attn_v", "attn_o", "attn_norm", "ffn_gate", "ffn_up", "ffn_down", "ffn_norm")]
    names.append("enc.blk.0.attn_rel_b.weight")
    for name in names:
        w.add_tensor(name, np.zeros(1, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def median_s(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ours(path: Path) -> None:
    fields, _ = _read_header(path)
    tokenizer_fields(path, fields)


if __name__ == "__main__":
    print("| file | header MB | t5core s | gguf.GGUFReader s | ratio |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, rows in (("T5 (32128 tokens)", 32128), ("UMT5 (256384 tokens)", 256384)):
            path = Path(tmp) / f"{rows}.gguf"
            write(path, rows)
            a = median_s(lambda: ours(path))
            b = median_s(lambda: gguf.GGUFReader(str(path)))
            print(f"| {label} | {path.stat().st_size / 1e6:.1f} | {a:.3f} | {b:.2f} | {b / a:.0f}x |", flush=True)
