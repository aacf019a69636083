"""The `lora-dpo` command: parses arguments and delegates; user errors become one line and exit code 2.

- `common`: the typer app, `--set`, quiet imports, the one-line failure, `--resume` alone
- `training`: train, cache, plan, bench, tiny-base, recipe-doc
- `adapters`: label, pairs, eval, export, merge, inspect, push
"""

# isort: off
from lora_dpo.cli import training  # registers train, cache, plan, ... first: the order of `lora-dpo --help`
from lora_dpo.cli import adapters
# isort: on
from lora_dpo.cli.common import app, bare_resume, run

main = run
__all__ = ["adapters", "app", "bare_resume", "main", "training"]
