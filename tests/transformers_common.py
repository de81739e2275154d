"""transformers' own common test files (`ModelTesterMixin`, `ConfigTester`, `BackboneTesterMixin`,
`ImageProcessingTestMixin`, `PipelineTesterMixin`), from the source distribution of the installed release.

scripts/setup_env.sh fetches that release's `tests/` folder into `.venv/transformers-tests/<version>/tests` and exports
its path as NEPA_TRANSFORMERS_TESTS. Its files import each other relatively, so they are loaded as one package,
`transformers_common_tests`, whose search path is that folder plus `transformers_stand_ins/` (the few modules the
sdist lacks).
"""

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import transformers

PACKAGE = "transformers_common_tests"
STAND_INS = Path(__file__).parent / "transformers_stand_ins"
FETCH_COMMAND = "bash scripts/setup_env.sh"


def transformers_tests_folder() -> Path:
    configured = os.environ.get("NEPA_TRANSFORMERS_TESTS")
    if configured:
        return Path(configured)
    return Path(sys.prefix) / "transformers-tests" / transformers.__version__ / "tests"


def load(module: str) -> types.ModuleType:
    """`transformers_common_tests.<module>`, e.g. load("test_modeling_common").

    Without the fetched folder the calling test module is skipped, naming the command that fetches it; under
    scripts/run_tests.sh (NEPA_REQUIRE_TRANSFORMERS_TESTS=1) that is an error instead, so CI cannot skip them.
    """
    folder = transformers_tests_folder()
    if not (folder / f"{module}.py").is_file():
        message = (
            f"transformers {transformers.__version__}'s common tests are not at {folder}: run `{FETCH_COMMAND}` "
            "(it fetches them from the release's source distribution), or set NEPA_TRANSFORMERS_TESTS to its tests/."
        )
        if os.environ.get("NEPA_REQUIRE_TRANSFORMERS_TESTS") == "1":
            raise RuntimeError(message)
        pytest.skip(message, allow_module_level=True)
    if PACKAGE not in sys.modules:
        # The repository's tests/ is a package; its sdist drops the empty __init__.py, which
        # test_configuration_common executes (`direct_transformers_import(<tests folder>)`).
        (folder / "__init__.py").touch()
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(folder), str(STAND_INS)]
        sys.modules[PACKAGE] = package
        # test_image_processing_common imports `fetch_hub_objects_for_ci` from the repository's utils/ folder.
        sys.path.append(str(STAND_INS))
    return importlib.import_module(f"{PACKAGE}.{module}")
