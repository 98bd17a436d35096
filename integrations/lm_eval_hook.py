"""Makes ``lm_eval --model hf-prune`` resolve: the source of the ``hf_prune_lm_eval.pth`` file the wheel ships.

lm-evaluation-harness 0.4.13 finds models only in its own registry (``lm_eval.api.registry.model_registry``),
which ``lm_eval.models`` fills with lazy ``"module:Class"`` entries when it is imported; it reads no entry
points for models. So ``setup.py`` turns this file into one line of a ``.pth`` file at the root of
site-packages (``import sys; exec(<this source>, {}); install()`` in effect), which Python runs at start-up.

``install()`` puts a finder at the front of ``sys.meta_path`` that ignores every import but
``lm_eval.models``; for that one it lets the other finders find the real module, and wraps its loader so that
right after the module runs, ``hf-prune`` is registered as one more lazy entry pointing at
``hf_prune.integrations.lm_eval_model:HFPruneLM``, and the finder removes itself. Nothing is imported at
start-up but ``sys``; torch, transformers and hf_prune load only when a run asks for ``--model hf-prune``.

Standard library only (it runs inside ``site``, before anything else); every failure is swallowed, so a
broken lm-eval install can never break an unrelated Python process.
"""

import sys

MODEL_NAME = "hf-prune"
MODEL_TARGET = "hf_prune.integrations.lm_eval_model:HFPruneLM"
WATCHED_MODULE = "lm_eval.models"


def register(registry) -> None:
    """Add the lazy ``hf-prune`` entry to lm-eval's model registry unless it is already there."""
    if MODEL_NAME not in registry:
        registry.register(MODEL_NAME, target=MODEL_TARGET)


class LmEvalModelsFinder:
    """A ``sys.meta_path`` finder that only watches ``lm_eval.models`` being imported."""

    def find_spec(self, name, path=None, target=None):
        if name != WATCHED_MODULE:
            return None
        spec = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            try:
                from lm_eval.api.registry import model_registry

                register(model_registry)
            except Exception:  # an lm-eval without this registry: it simply has no hf-prune model
                pass
            finally:
                if self in sys.meta_path:
                    sys.meta_path.remove(self)

        spec.loader.exec_module = exec_module  # the loader instance belongs to this spec alone
        return spec


def install() -> None:
    """Watch for ``lm_eval.models`` (once per process; a no-op if it is already imported)."""
    try:
        if WATCHED_MODULE in sys.modules:
            from lm_eval.api.registry import model_registry

            register(model_registry)
        elif not any(type(f).__name__ == LmEvalModelsFinder.__name__ for f in sys.meta_path):
            sys.meta_path.insert(0, LmEvalModelsFinder())
    except Exception:
        pass
