"""Checks request bodies against SGLang's own request types; run with the python of
tools/setup_sglang_schema.sh: `python sglang_schema.py < payloads.json` prints one verdict per payload.

`sglang.srt.managers.io_struct` is imported without executing `sglang/__init__.py` (it patches
transformers and loads the frontend language) and with placeholders for two imports that only a
GPU install can satisfy: `triton` (only when absent) and `sglang.srt.managers.schedule_batch`
(whose imports reach the CUDA kernels; io_struct uses its names as annotations, and calls
`get_return_hidden_states_mode` to validate `return_hidden_states`, which here accepts only the
default False: we never ask for hidden states). A payload touching a placeholder fails loudly.

Each request is checked the way SGLang's HTTP server reads it: `/generate` bodies become a
`GenerateReqInput` (unknown keys are a TypeError), are normalised (n fan-out, defaults) and their
sampling parameters are decoded and verified as SGLang's `SamplingParams`; the other routes'
bodies build their msgspec request structs (unknown keys are a TypeError), which are then
converted through builtins so that msgspec checks every field's type (and decodes base64 bytes).
"""

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import types


class Placeholder:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__module__}.{type(self).__name__} is a schema-check placeholder")


def no_hidden_states(mode):
    if mode is not False:
        raise RuntimeError(f"return_hidden_states={mode!r} cannot be checked here: the placeholder accepts only False")


class PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name == "get_return_hidden_states_mode":
            return no_hidden_states
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (Placeholder,), {"__module__": self.__name__})


class SchemaImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`sglang` as a bare package (its __init__ not run); placeholders for GPU-only modules."""

    def __init__(self):
        self.root = os.path.dirname(importlib.util.find_spec("sglang").origin)
        self.placeholders = {"sglang.srt.managers.schedule_batch"}
        if importlib.util.find_spec("triton") is None:
            self.placeholders.add("triton")

    def find_spec(self, name, path, target=None):
        if name == "sglang":
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [self.root]
            return spec
        if name in self.placeholders or name.split(".")[0] in self.placeholders:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


ROUTES = {"/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
          "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
          "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
          "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
          "/release_memory_occupation": "ReleaseMemoryOccupationReqInput",
          "/resume_memory_occupation": "ResumeMemoryOccupationReqInput"}


def typed(struct, fields):
    """A msgspec struct from JSON fields: unknown keys are a TypeError, then a round trip through
    builtins makes msgspec check every field's type (and decode base64 strings into bytes)."""
    import msgspec

    return msgspec.convert(msgspec.to_builtins(struct(**fields)), struct)


def check(io_struct, route, body):
    from sglang.srt.sampling.sampling_params import SamplingParams

    if route == "/generate":
        request = io_struct.GenerateReqInput(**body)
        request.normalize_batch_and_arguments()
        params = typed(SamplingParams, body["sampling_params"])
        params.verify(vocab_size=1 << 20)
        return {"batch_size": request.batch_size, "parallel_sample_num": request.parallel_sample_num,
                "top_k": params.top_k, "stop_strs": params.stop_strs}
    cls = getattr(io_struct, ROUTES[route])
    request = typed(cls, body)
    return {name: getattr(request, name) for name in body if isinstance(getattr(request, name), (int, str, bool))}


def main():
    sys.meta_path.insert(0, SchemaImporter())
    import sglang.srt.managers.io_struct as io_struct

    verdicts = []
    for route, body in json.load(sys.stdin):
        try:
            verdicts.append({"ok": True, "seen": check(io_struct, route, body)})
        except Exception as err:  # the verdict carries the error back to the test
            verdicts.append({"ok": False, "error": f"{type(err).__name__}: {err}"})
    print(json.dumps(verdicts, default=str))


if __name__ == "__main__":
    main()
