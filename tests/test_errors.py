"""One error family: every exception class the package defines derives from LoraDpoError, which the CLI turns
into one line and exit code 2. Found by walking every module, so a new class cannot slip past a hand-made list."""

import importlib
import inspect
import pkgutil

import lora_dpo
from lora_dpo.errors import LoraDpoError


def _modules() -> list:
    names = [info.name for info in pkgutil.walk_packages(lora_dpo.__path__, "lora_dpo.")
             if info.name != "lora_dpo.__main__"]
    return [importlib.import_module(name) for name in names]


def test_every_exception_class_of_the_package_is_a_lora_dpo_error() -> None:
    found = {cls for module in _modules() for _, cls in inspect.getmembers(module, inspect.isclass)
             if issubclass(cls, BaseException) and cls.__module__.startswith("lora_dpo")}
    assert len(found) >= 8  # RecipeError, DataError, ModelError, AdapterError, EvalError, PlanError, ...
    assert {cls.__name__ for cls in found if not issubclass(cls, LoraDpoError)} == set()

