"""bitsandbytes' NF4 and int8 quantisers on any device, bit for bit (LoftQ's quantisation step).

- ``nf4_quantize(X, blocksize=64) -> (packed uint8 (⌈n/2⌉, 1), absmax fp32 (⌈n/blocksize⌉,))``: bitsandbytes'
  ``quantize_4bit(quant_type="nf4", compress_statistics=False)`` on ``X.reshape(-1)`` (row-major), blocks of
  ``blocksize`` values: ``absmax_b = max |x|``, ``q = #{t ∈ NF4_THRESHOLDS : t < x·(1/absmax_b)}`` (the last, shorter
  block divides by its absmax), two codes per byte, high nibble first.
- ``nf4_dequantize(packed, absmax, shape, blocksize=64) -> fp32``: ``NF4_CODE[q] · absmax_b``.
- ``nf4_roundtrip(X)``: ``nf4_dequantize(nf4_quantize(X))`` in one chunked pass, no packing.
- ``int8_roundtrip(X) -> fp32``: ``Int8Params`` (``X`` cast to fp16, row absmax ``SCB``, ``CB = round(x·(127/SCB))``)
  then ``int8_vectorwise_dequant`` (``CB · SCB · (1/127)``).

Which bitsandbytes: its CPU implementation (``backends/default/ops.py`` of 0.50, which runs here and which the tests
compare against, bit for bit). Its CUDA kernel (``kQuantizeBlockwise`` with ``dQuantizeNF4``, a decision tree over the
same 15 thresholds: ``NF4_THRESHOLDS`` are its constants, equal to the fp32 midpoints of ``NF4_CODE``) differs in one
place: it is compiled with ``--use_fast_math``, so ``1/absmax`` is an approximate reciprocal (≤ 1 ulp) and a value
within an ulp of a threshold may fall in the other bucket; its int8 kernel likewise scales by ``__fdividef(127,
absmax)``.
"""
from __future__ import annotations

import torch

# bitsandbytes.functional.get_4bit_type("nf4"), as fp32
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
            1.0)
# the constants of bitsandbytes' CUDA dQuantizeNF4 decision tree (csrc/kernels.cu), in increasing order
NF4_THRESHOLDS = (-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
                  -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
                  0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
                  0.5016634166240692, 0.6427869200706482, 0.8614784181118011)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_INV_127 = 7.874015718698502e-3  # bitsandbytes' int8_vectorwise_dequant factor
_ZERO_CODE = NF4_CODE.index(0.0)
_CHUNK_ELEMS = 1 << 20  # values per chunk (a multiple of every block size)


def _tables(device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(NF4_CODE, dtype=torch.float32, device=device),
            torch.tensor(NF4_THRESHOLDS, dtype=torch.float32, device=device))


def _check(X: torch.Tensor, blocksize: int, name: str) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"loram_fast.{name}: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    if not X.is_floating_point():
        raise TypeError(f"loram_fast.{name}: expected a floating-point tensor, got {X.dtype}")


def _nf4_codes(flat: torch.Tensor, blocksize: int, thresholds: torch.Tensor, tail: bool):
    """Codes (int32) and absmax of fp32 ``flat``: whole blocks scaled by ``x·(1/absmax)``; ``tail``: the last
    (shorter) block scaled by ``x/absmax``, as bitsandbytes does."""
    if tail:
        absmax = flat.abs().max().reshape(1)
        scaled = torch.clamp(flat / absmax.clamp(min=1e-38), -1, 1)
    else:
        blocks = flat.view(-1, blocksize)
        absmax = blocks.abs().max(dim=-1)[0]
        scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    return torch.bucketize(scaled, thresholds, out_int32=True), absmax


def _nf4_chunks(X: torch.Tensor, blocksize: int):
    """``(start, codes, absmax, block count)`` per chunk of ``X.reshape(-1)`` (fp32 chunks of ~4 MiB)."""
    _, thresholds = _tables(X.device)
    flat = X.reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    step = max(blocksize, _CHUNK_ELEMS - _CHUNK_ELEMS % blocksize)
    for start in range(0, full, step):
        stop = min(start + step, full)
        codes, absmax = _nf4_codes(flat[start:stop].float(), blocksize, thresholds, tail=False)
        yield start, codes, absmax
    if full < n:
        codes, absmax = _nf4_codes(flat[full:].float(), blocksize, thresholds, tail=True)
        yield full, codes, absmax


def nf4_quantize(X: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' NF4 ``quantize_4bit`` of X: ``(packed uint8 (⌈n/2⌉, 1), absmax fp32)`` (module docstring)."""
    _check(X, blocksize, "nf4_quantize")
    n = X.numel()
    codes = torch.full((n + n % 2,), _ZERO_CODE, dtype=torch.uint8, device=X.device)  # an odd count pads a 0.0
    absmax = []
    for start, q, am in _nf4_chunks(X, blocksize):
        codes[start:start + q.numel()] = q.to(torch.uint8)
        absmax.append(am)
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
    return packed, torch.cat(absmax) if absmax else torch.zeros(0, device=X.device)


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit`` (NF4) of :func:`nf4_quantize`'s output, fp32 of ``shape``."""
    code, _ = _tables(packed.device)
    packed = packed.reshape(-1)
    q = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1).long()
    n = int(torch.Size(shape).numel())
    values = code[q][:n]
    scale = absmax.repeat_interleave(blocksize)[:n]
    return (values * scale).reshape(shape)


def nf4_roundtrip(X: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """``nf4_dequantize(*nf4_quantize(X), X.shape)`` in chunks, fp32 (no packed copy)."""
    _check(X, blocksize, "nf4_roundtrip")
    code, _ = _tables(X.device)
    out = torch.empty(X.shape, dtype=torch.float32, device=X.device)
    flat = out.view(-1)
    for start, q, am in _nf4_chunks(X, blocksize):
        values = code[q]
        if am.numel() == 1 and values.numel() < blocksize:  # the tail block
            flat[start:start + values.numel()] = values * am
        else:
            flat[start:start + values.numel()] = (values.view(-1, blocksize) * am.view(-1, 1)).reshape(-1)
    return out


def int8_quantize(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' ``Int8Params`` quantisation of X (rows × cols): ``(CB int8, SCB fp32 row absmax of fp16 X)``."""
    if X.dim() != 2 or not X.is_floating_point():
        raise ValueError(f"loram_fast.int8_quantize: expected a 2-D floating-point tensor, got "
                         f"{X.dtype} {tuple(X.shape)}")
    CB = torch.empty(X.shape, dtype=torch.int8, device=X.device)
    SCB = torch.empty(X.shape[0], dtype=torch.float32, device=X.device)
    step = max(1, _CHUNK_ELEMS // max(X.shape[1], 1))
    for start in range(0, X.shape[0], step):
        half = X[start:start + step].to(torch.float16)
        stats = torch.max(half.abs(), dim=1).values.float()
        CB[start:start + step] = torch.round(half * (127.0 / stats.unsqueeze(-1))).to(torch.int8)
        SCB[start:start + step] = stats
    return CB, SCB


def int8_dequantize(CB: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' ``int8_vectorwise_dequant``: ``CB · SCB · (1/127)``, fp32."""
    return CB * SCB.view(-1, 1) * _INV_127


def int8_roundtrip(X: torch.Tensor) -> torch.Tensor:
    """``int8_dequantize(*int8_quantize(X))``, fp32."""
    return int8_dequantize(*int8_quantize(X))


def roundtrip(X: torch.Tensor, bits: int) -> torch.Tensor:
    """LoftQ's quantise-then-dequantise of X (2-D): NF4 (``bits=4``, blocks of 64) or int8 rows (``bits=8``)."""
    if bits == 4:
        return nf4_roundtrip(X)
    if bits == 8:
        return int8_roundtrip(X)
    raise ValueError(f"loram_fast.quant: bits must be 4 (NF4) or 8 (int8), got {bits!r}")
