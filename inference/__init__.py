"""inference: the native PSIR loop (Plan -> Sketch -> Inspect -> Refine) and inference-time scaling.

    from inference import Generator, GenerateOptions
    result = Generator.from_pretrained(ckpt, GenerateOptions(mode="psir")).generate("a red circle", seed=0)

Layers: `settings` (every option) ; `kv_cache` (in-place, forkable KV cache) -> `engine` (contexts,
decoding, flow sampling, written as `batching` programs: alone, or many samples per packed forward) -> `psir`
(the loop) -> `scaling` (P x I x k search with `verifiers`) -> `api` (`bagel-ft generate`: commands/generate.py); `sharding` splits prompts over
processes; `html` renders a trajectory. The OpenAI-compatible chat client of the `vlm` critic is `common.endpoint`.
"""

from inference.settings import GenerateOptions

__all__ = ["GenerateOptions", "Generator", "Result", "generate", "load"]


def __getattr__(name):  # the API pulls in torch and the model; keep `import inference` (and --help) light
    if name in ("Generator", "Result", "generate", "load"):
        from inference import api

        return getattr(api, name)
    raise AttributeError(name)
