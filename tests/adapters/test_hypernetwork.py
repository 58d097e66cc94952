"""Hypernetworks: A1111 `.pt` -> convert -> load -> apply, against A1111's formula by hand."""

from __future__ import annotations

import io
import json

import pytest
import safetensors.torch
import torch

from sdserve.adapters.convert import convert_file
from sdserve.adapters.hypernetwork import METADATA_KEY, apply_hypernetwork, load_hypernetwork
from sdserve.errors import AdapterError

# A1111-layout pickles written the way AUTOMATIC1111's webui saves them: each MLP is built as
# `HypernetworkModule.__init__` builds it (Linear, activation unless last-and-not-activate_output,
# LayerNorm if is_layer_norm, Dropout per the dropout structure), so the `linear.{j}` indices are
# the real ones, and the dict is what `Hypernetwork.save` writes.

A1111_ACTIVATIONS = {
    "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU, "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "gelu": torch.nn.GELU,
}


def a1111_module(width: int, structure: list[float], activation: str | None, layer_norm: bool,
                 activate_output: bool, dropout: list[float] | None, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i in range(len(structure) - 1):
        layers.append(torch.nn.Linear(int(width * structure[i]), int(width * structure[i + 1])))
        if activation in (None, "linear") or (i >= len(structure) - 2 and not activate_output):
            pass
        else:
            layers.append(A1111_ACTIVATIONS[activation]())
        if layer_norm:
            layers.append(torch.nn.LayerNorm(int(width * structure[i + 1])))
        if dropout is not None and dropout[i + 1] > 0:
            layers.append(torch.nn.Dropout(p=dropout[i + 1]))
    sequential = torch.nn.Sequential(*layers).eval()
    with torch.no_grad():  # non-trivial norms and biases, so every parameter matters
        for parameter in sequential.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return sequential


def _a1111_state(sequential: torch.nn.Sequential) -> dict[str, torch.Tensor]:
    """HypernetworkModule holds its Sequential as `self.linear`."""
    return {f"linear.{key}": value for key, value in sequential.state_dict().items()}


def a1111_hypernetwork(widths: list[int], structure: list[float], activation: str | None, layer_norm: bool,
                       activate_output: bool, dropout: list[float] | None = None
                       ) -> tuple[dict, dict[int, tuple[torch.nn.Sequential, torch.nn.Sequential]]]:
    """(the dict A1111 saves, {width: (k, v) Sequentials}) for the given settings."""
    modules = {
        width: tuple(a1111_module(width, structure, activation, layer_norm, activate_output, dropout, seed=width * 2 + s)
                     for s in range(2))
        for width in widths
    }
    saved: dict = {width: (_a1111_state(k), _a1111_state(v)) for width, (k, v) in modules.items()}
    saved.update({
        "step": 1000, "name": "myhn", "layer_structure": structure, "activation_func": activation,
        "is_layer_norm": layer_norm, "weight_initialization": "Normal", "sd_checkpoint": "a1b2c3d4",
        "sd_checkpoint_name": "v1-5-pruned", "activate_output": activate_output,
        "use_dropout": dropout is not None, "dropout_structure": dropout,
        "last_layer_dropout": dropout is not None and dropout[-2] != 0, "optional_info": None,
    })
    return saved, modules


WIDTHS = [32, 48]

# The activations by their formulas, not by torch's functions.
HAND_ACTIVATIONS = {
    None: lambda x: x,
    "relu": lambda x: torch.where(x > 0, x, torch.zeros_like(x)),
    "leakyrelu": lambda x: torch.where(x > 0, x, 0.01 * x),
    "elu": lambda x: torch.where(x > 0, x, torch.exp(x) - 1),
    "swish": lambda x: x * torch.clamp(x + 3, 0, 6) / 6,  # A1111's "swish" is Hardswish
    "tanh": lambda x: (torch.exp(x) - torch.exp(-x)) / (torch.exp(x) + torch.exp(-x)),
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
}


def hand_forward(x: torch.Tensor, state: dict[str, torch.Tensor], structure: list[float], activation,
                 layer_norm: bool, activate_output: bool, strength: float) -> torch.Tensor:
    """x + MLP(x)·strength, walking A1111's Sequential layout by hand: Linear as x Wᵀ + b,
    LayerNorm as (h - mean)/sqrt(var + 1e-5)·g + b, dropout skipped."""
    linears = sorted({int(k.split(".")[1]) for k in state if state[k].ndim == 2})
    hidden = x.double()
    for i, index in enumerate(linears):
        weight, bias = state[f"linear.{index}.weight"].double(), state[f"linear.{index}.bias"].double()
        hidden = hidden @ weight.T + bias
        if i < len(linears) - 1 or activate_output:
            hidden = HAND_ACTIVATIONS[activation](hidden)
        if layer_norm:
            norm_index = next(j for j in range(index + 1, index + 3) if state.get(f"linear.{j}.weight", torch.zeros(1, 1)).ndim == 1)
            gain, shift = state[f"linear.{norm_index}.weight"].double(), state[f"linear.{norm_index}.bias"].double()
            mean = hidden.mean(-1, keepdim=True)
            var = ((hidden - mean) ** 2).mean(-1, keepdim=True)
            hidden = (hidden - mean) / torch.sqrt(var + 1e-5) * gain + shift
    assert len(linears) == len(structure) - 1
    return x.double() + hidden * strength


SETTINGS = [
    # structure, activation, layer_norm, activate_output, dropout
    ([1, 2, 1], None, False, False, None),
    ([1, 2, 1], "relu", True, False, [0, 0.3, 0]),
    ([1, 1.5, 2, 1], "swish", False, True, [0, 0.3, 0.3, 0]),
    ([1, 2, 2, 1], "leakyrelu", True, True, [0, 0.1, 0.1, 0]),
    ([1, 0.5, 1], "elu", False, False, None),
    ([1, 2, 1], "tanh", True, False, None),
    ([1, 2, 1], "sigmoid", False, True, None),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=[str(s[1]) + ("-ln" if s[2] else "") for s in SETTINGS])
def test_converted_hypernetwork_matches_a1111_formula(tmp_path, settings):
    structure, activation, layer_norm, activate_output, dropout = settings
    saved, modules = a1111_hypernetwork(WIDTHS, structure, activation, layer_norm, activate_output, dropout)
    torch.save(saved, tmp_path / "hn.pt")
    assert convert_file(tmp_path / "hn.pt", tmp_path / "hn.safetensors") == "hypernetwork"
    hypernetwork = load_hypernetwork(tmp_path / "hn.safetensors", "hn", widths={32, 48, 320})
    assert sorted(hypernetwork.modules) == WIDTHS

    for width in WIDTHS:
        context = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(width))  # [batch, tokens, width]
        for side, mlp in zip("kv", hypernetwork.modules[width]):
            state = saved[width]["kv".index(side)]
            for strength in (1.0, 0.6, -0.5):
                expected = hand_forward(context, state, structure, activation, layer_norm, activate_output, strength)
                got = apply_hypernetwork(context, mlp, strength)
                torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
            # A1111's module in eval mode, as a second witness: x + linear(x) * multiplier.
            with torch.no_grad():
                module_out = context + modules[width]["kv".index(side)](context) * 0.6
            torch.testing.assert_close(apply_hypernetwork(context, mlp, 0.6), module_out, rtol=1e-5, atol=1e-5)


def test_apply_is_pure_and_takes_per_row_strength(tmp_path):
    saved, _ = a1111_hypernetwork([32], [1, 2, 1], "relu", False, False)
    torch.save(saved, tmp_path / "hn.pt")
    convert_file(tmp_path / "hn.pt", tmp_path / "hn.safetensors")
    k_mlp, _ = load_hypernetwork(tmp_path / "hn.safetensors", "hn").modules[32]
    weights_before = [w.clone() for w in k_mlp.weights]
    context = torch.randn(3, 4, 32)  # [rows, tokens, width]
    context_before = context.clone()
    strengths = torch.tensor([0.0, 1.0, 0.5]).view(3, 1, 1)
    out = apply_hypernetwork(context, k_mlp, strengths)
    assert torch.equal(out[0], context[0])  # strength 0 leaves the row alone
    torch.testing.assert_close(out[2], apply_hypernetwork(context[2], k_mlp, 0.5))
    assert torch.equal(context, context_before)
    assert all(torch.equal(a, b) for a, b in zip(k_mlp.weights, weights_before))


def test_old_linear1_linear2_files(tmp_path):
    torch.manual_seed(0)
    w1, b1, w2, b2 = torch.randn(64, 32), torch.randn(64), torch.randn(32, 64), torch.randn(32)
    state = {"linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2, "linear2.bias": b2}
    torch.save({32: (state, state)}, tmp_path / "old.pt")
    convert_file(tmp_path / "old.pt", tmp_path / "old.safetensors")
    k_mlp, _ = load_hypernetwork(tmp_path / "old.safetensors", "old").modules[32]
    x = torch.randn(3, 32)
    torch.testing.assert_close(apply_hypernetwork(x, k_mlp, 1.0), x + (x @ w1.T + b1) @ w2.T + b2,
                               rtol=1e-5, atol=1e-4)


def test_widths_the_model_lacks(tmp_path):
    saved, _ = a1111_hypernetwork([32, 48], [1, 2, 1], "relu", False, False)
    torch.save(saved, tmp_path / "hn.pt")
    convert_file(tmp_path / "hn.pt", tmp_path / "hn.safetensors")
    partial = load_hypernetwork(tmp_path / "hn.safetensors", "hn", widths={32, 64})
    assert sorted(partial.modules) == [32] and partial.ignored_widths == (48,)
    with pytest.raises(AdapterError, match=r"no module matches the model's attention widths \[64\]"):
        load_hypernetwork(tmp_path / "hn.safetensors", "hn", widths={64})


def test_pickles_are_refused_by_the_loader(tmp_path):
    buffer = io.BytesIO()
    torch.save({32: ({}, {})}, buffer)
    (tmp_path / "hn.pt").write_bytes(buffer.getvalue())
    for source, name in ((tmp_path / "hn.pt", "hn.pt"), (buffer.getvalue(), "hn.safetensors")):
        with pytest.raises(AdapterError, match="a pickle file; convert it offline with `sdserve adapters convert`") as info:
            load_hypernetwork(source, name)
        assert str(tmp_path) not in str(info.value)


def _good_file() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    config = {"format": 1, "layer_structure": [1, 2, 1], "activation": "relu", "activate_output": False,
              "layer_norm": False}
    tensors = {}
    for side in "kv":
        tensors |= {f"hypernetwork.8.{side}.0.weight": torch.randn(16, 8), f"hypernetwork.8.{side}.0.bias": torch.randn(16),
                    f"hypernetwork.8.{side}.1.weight": torch.randn(8, 16), f"hypernetwork.8.{side}.1.bias": torch.randn(8)}
    return tensors, {METADATA_KEY: json.dumps(config)}


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t, m: t.__setitem__("hypernetwork.8.k.0.weight", torch.randn(16, 9)), "has shape [16, 9], expected [16, 8]"),
        (lambda t, m: t.__setitem__("hypernetwork.8.v.1.bias", torch.full((8,), float("inf"))), "NaN or infinite"),
        (lambda t, m: t.pop("hypernetwork.8.v.1.bias"), "missing '1.bias'"),
        (lambda t, m: t.__setitem__("other", torch.zeros(1)), "unexpected key 'other'"),
        (lambda t, m: [t.pop(k) for k in list(t) if ".v." in k], "needs both k and v"),
        (lambda t, m: m.pop(METADATA_KEY), "not a hypernetwork file"),
        (lambda t, m: m.__setitem__(METADATA_KEY, m[METADATA_KEY].replace("relu", "prelu")), "activation 'prelu'"),
        (lambda t, m: m.__setitem__(METADATA_KEY, m[METADATA_KEY].replace("[1, 2, 1]", "[2, 1]")), "layer_structure"),
        (lambda t, m: m.__setitem__(METADATA_KEY, "{"), "metadata is not valid"),
    ],
)
def test_bad_hypernetwork_files(edit, needle):
    tensors, metadata = _good_file()
    assert load_hypernetwork(safetensors.torch.save(tensors, metadata=metadata), "hn").modules
    edit(tensors, metadata)
    with pytest.raises(AdapterError, match=None) as info:
        load_hypernetwork(safetensors.torch.save(tensors, metadata=metadata), "hn.safetensors")
    assert needle in str(info.value) and "hn.safetensors" in str(info.value)
