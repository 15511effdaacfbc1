"""Start-up hook (run from swift_gradpruner.pth in every Python process): makes ``swift sft`` accept
``--gradprune``.

``swift sft`` re-executes ``swift/cli/sft.py`` in a child process (under torchrun: one per rank),
whose ms-swift argument parser rejects flags it does not know; plugins named by
``--external_plugins`` are imported only after that parse. So the only place to act is interpreter
start-up of that child. This module does nothing unless the process is ``swift/cli/sft.py`` AND a
``--gradprune*`` flag is present; then it arranges for ``swift.pipelines.train.sft.sft_main`` to be
wrapped when swift imports it. The flags stay in ``sys.argv``: the wrapper takes them out of the
arguments it hands to swift, so if a future ms-swift moves that function and the wrapper never
runs, swift's own parser rejects the unknown ``--gradprune`` flags loudly instead of running a
plain dense fine-tune. Everything else (the version check first, flag validation, the run itself)
happens in ``swift_gradpruner.swift.entry``. It imports only ``sys`` at module level so that
unrelated processes pay (almost) nothing. Without any start-up hook, ``gradprune sft ...`` runs
the same thing (swift_gradpruner/swift/sft_cli.py).
"""

import sys

SWIFT_SFT_SCRIPT = "swift/cli/sft.py"
TARGET_MODULE = "swift.pipelines.train.sft"
RAY_MODULE = "swift.ray_utils"
PENDING: list[str] = []
"""The ``--gradprune*`` arguments taken out of sys.argv, for the wrapped sft_main."""


def install() -> None:
    if getattr(sys, "_swift_gradpruner_hooked", False) or len(sys.argv) < 2:
        return
    if not sys.argv[0].replace("\\", "/").endswith(SWIFT_SFT_SCRIPT):
        return
    from .swift.args import is_gradprune_token

    if not any(is_gradprune_token(token) for token in sys.argv[1:]):
        return
    sys._swift_gradpruner_hooked = True
    PENDING[:] = sys.argv[1:]
    sys.meta_path.insert(0, _PatchSftMain())


class _PatchSftMain:
    """A sys.meta_path finder: when swift imports its sft pipeline module, it replaces that module's
    ``sft_main`` with GradPruner's; when it imports ``swift.ray_utils``, whose ``try_init_ray`` starts
    Ray before ``sft_main`` is reached, it refuses ``--use_ray`` first."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in (TARGET_MODULE, RAY_MODULE):
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        original_exec = spec.loader.exec_module

        def exec_module(module):
            original_exec(module)
            if fullname == RAY_MODULE:
                from .swift.entry import refuse_ray

                module.try_init_ray = refuse_ray(module.try_init_ray, PENDING)
                return
            from .swift.entry import wrap_sft_main

            module.sft_main = wrap_sft_main(module.sft_main, PENDING)

        spec.loader.exec_module = exec_module
        return spec
