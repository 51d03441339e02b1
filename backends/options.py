"""Typed backend options: one pydantic model per backend, validated before anything loads.

As optimum-benchmark's ``BackendConfig`` subclasses: a shared base (``device``, ``threads``,
``seed``) that every backend reads the same way, and each backend's own fields with a type, a
default and a one-line description (``python -m harness list --options NAME`` prints them).
Command-line values arrive as strings; pydantic's lax mode turns ``"2"`` into ``2`` and
``"true"``/``"0"`` into booleans, and anything else into an ``OptionError`` naming the key.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class OptionError(ValueError):
    """A backend option is unknown, ill-typed or out of range; the message is one line naming the
    backend, the key and the valid keys or values."""


class BackendOptions(BaseModel):
    """Options every backend has. Subclass it per backend and add fields with ``Field(default,
    description=...)``; unknown keys are rejected (``extra="forbid"``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where to run; auto = cuda when the engine sees a CUDA device, else cpu")
    threads: int | None = Field(
        None, ge=1, description="CPU threads of the engine's compute (torch intra-op, ONNX Runtime "
        "intra-op, TVM thread pool); default: the physical cores")
    seed: int = Field(0, ge=0, description="seed of python, numpy and torch RNGs, set at load")

    @classmethod
    def keys(cls) -> list[str]:
        """The option names, in declaration order."""
        return list(cls.model_fields)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """``(name, type, default, description)`` of every option, for ``harness list --options``."""
        rows = []
        for name, info in cls.model_fields.items():
            kind = str(info.annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
            rows.append((name, kind, repr(info.default), info.description or ""))
        return rows


def check_sink_window(sliding_window: int, attention_sink: int) -> None:
    """Validate a sliding-window / attention-sink pair (tokens; ``sliding_window`` 0 = off), the
    rule shared by ``mlc`` and the transformers backends.

    Raises:
        ValueError: a sink without a window, or a sink not smaller than the window.
    """
    if attention_sink and not sliding_window:
        raise ValueError("attention_sink needs sliding_window > 0")
    if sliding_window and attention_sink >= sliding_window:
        raise ValueError("attention_sink must be smaller than sliding_window")


def _describe_error(exc: ValidationError, backend: str, cls: type[BackendOptions]) -> str:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{backend}: unknown option {key!r}; valid: {', '.join(cls.keys())}"
    message = error["msg"].removeprefix("Value error, ")
    if not key:  # a check across options (model validator)
        return f"{backend}: {message}"
    return f"{backend}: option {key}={error.get('input')!r}: {message}"


def parse_options(cls: type[BackendOptions], backend: str,
                  values: Mapping[str, Any] | BackendOptions | None) -> BackendOptions:
    """Validate ``values`` (strings from the command line, or typed values) into ``cls``.

    Raises:
        OptionError: an unknown key, a wrong type or an out-of-range value (first problem only).
    """
    if isinstance(values, cls):
        return values
    if isinstance(values, BackendOptions):
        values = values.model_dump(exclude_unset=True)
    try:
        return cls.model_validate(dict(values or {}))
    except ValidationError as exc:
        raise OptionError(_describe_error(exc, backend, cls)) from None


def split_addressed(pairs: list[tuple[str, str]], backends: Mapping[str, type[BackendOptions]]
                    ) -> dict[str, dict[str, str]]:
    """Route ``--backend-option`` pairs to the chosen backends.

    ``mlc.sliding_window=1024`` goes to ``mlc`` only; an unprefixed ``threads=2`` goes to every
    chosen backend whose options have that key. Later pairs override earlier ones.

    Args:
        pairs: ``(key, value)`` as typed, e.g. ``("mlc.sliding_window", "1024")``.
        backends: the chosen backend names -> their options class.

    Returns:
        backend name -> ``{key: value}`` (values unvalidated; ``parse_options`` checks them).

    Raises:
        OptionError: a prefix that is not a chosen backend, or an unprefixed key no chosen
            backend has.
    """
    routed: dict[str, dict[str, str]] = {name: {} for name in backends}
    for key, value in pairs:
        prefix, dot, bare = key.partition(".")
        if dot:
            if prefix not in backends:
                raise OptionError(f"option {key!r} is for backend {prefix!r}, which is not in this run "
                                  f"(backends: {', '.join(backends)})")
            routed[prefix][bare] = value
            continue
        takers = [name for name, cls in backends.items() if key in cls.model_fields]
        if not takers:
            valid = sorted({k for cls in backends.values() for k in cls.keys()})
            raise OptionError(f"unknown option {key!r} for backends {', '.join(backends)}; valid: "
                              f"{', '.join(valid)} (address one backend as NAME.KEY=VALUE)")
        for name in takers:
            routed[name][key] = value
    return routed
