"""Vectorisable float32 math for the compiled kernels (TIR expressions).

LLVM lowers TIR's ``exp``/``exp2``/``sigmoid`` to scalar libm calls on x86, so a loop that uses
them is never vectorised; these polynomial forms are plain arithmetic and bit operations.
"""

from __future__ import annotations

import math

LOG2E = math.log2(math.e)
EXP2_COEF = [math.log(2) ** n / math.factorial(n) for n in range(7)]  # Taylor, |f| <= 0.5


def exp2(x):
    """``2**x`` as a vectorisable TIR expression (LLVM has no vector exp2; the libm call it emits
    instead is scalar): ``x = n + f`` with ``n = round(x)``, ``|f| <= 1/2``, a degree-6 Taylor
    polynomial for ``2**f`` (relative error < 2e-7) times ``2**n`` built in the exponent bits.
    Inputs are clamped to [-126, 126] (2**-126 ~ 1e-38 stands for 0 in the callers)."""
    from tvm.script import tirx as T

    xc = T.min(T.max(x, T.float32(-126.0)), T.float32(126.0))
    n = T.floor(xc + T.float32(0.5))
    f = xc - n
    p = T.float32(EXP2_COEF[6])
    for c in reversed(EXP2_COEF[:6]):
        p = p * f + T.float32(c)
    return p * T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))


def silu(x):
    """``x * sigmoid(x) = x / (1 + 2**(-x log2 e))`` with ``exp2`` above (relative error < 1e-5)."""
    from tvm.script import tirx as T

    return x / (T.float32(1.0) + exp2(-x * T.float32(LOG2E)))
