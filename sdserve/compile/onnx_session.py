"""Opening a compiled component in onnxruntime, with its refit weights where it has them.

A refit directory (`refit.py`) points at its base export's graph and weights (read in place,
`manifest.graph_dir`) and holds, per component, a safetensors file of new values for some
initializers. The session opens the export's graph and takes those values as
external initializers (`SessionOptions.add_external_initializers`): every initializer of an
export lives in its external data file, and `add_initializer` does not reliably replace those in
onnxruntime 1.32 (measured: 20 changed projection weights, each feeding a Transpose, given that
way left the text encoder's output exactly the base graph's; changed norm weights did take
effect), while `add_external_initializers` gives exactly the output of a graph re-saved with the
new values. The values must outlive the session: they are kept on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdserve.compile.manifest import Component, Manifest, graph_dir


def component_overrides(directory: Path, component: Component) -> dict[str, Any]:
    """initializer name -> numpy array of the component's refit weights ({} where it has none)."""
    if not component.overrides:
        return {}
    from safetensors.numpy import load_file

    return load_file(str(Path(directory) / component.overrides))


def open_session(directory: Path, manifest: Manifest, name: str, providers: list[str] | None = None,
                 options: Any = None) -> Any:
    """An onnxruntime InferenceSession of component `name`, refit weights applied."""
    import onnxruntime

    component = manifest.components[name]
    options = options or onnxruntime.SessionOptions()
    options.log_severity_level = 3
    overrides = component_overrides(directory, component)
    values = [onnxruntime.OrtValue.ortvalue_from_numpy(array) for array in overrides.values()]
    if overrides:
        options.add_external_initializers(list(overrides), values)
    session = onnxruntime.InferenceSession(str(graph_dir(directory, manifest) / component.graph), options,
                                           providers=providers or ["CPUExecutionProvider"])
    session._sdserve_overrides = values  # onnxruntime reads them in place: keep them alive
    return session
