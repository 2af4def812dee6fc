"""Options as typed data: each options class's fields are its flag table, which writes the commands'
parameters and checks every value against its row's bound (one error naming the flag, exit 2)."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.main import get_command
from typer.testing import CliRunner

from phlora_nim.cli.adapter_options import ExportFlags, ExtractFlags, InspectFlags, PruneFlags, VerifyFlags
from phlora_nim.cli.convert_options import ConvertFlags, JobFlags
from phlora_nim.cli.extraction_flags import DecompositionFlags, FidelityFlags, RankFlags
from phlora_nim.cli.flags import build, command, option, rows
from phlora_nim.cli.repository_options import AdaptersFlags, EnginePlanFlags, RemoveFlags
from phlora_nim.core.bounds import Bound, OneOf
from phlora_nim.core.errors import OptionError

# Each command and the options classes whose rows make its parameters.
COMMANDS = {
    "extract": (ExtractFlags, RankFlags, FidelityFlags, DecompositionFlags),
    "prune": (PruneFlags, RankFlags),
    "export": (ExportFlags,),
    "verify": (VerifyFlags,),
    "inspect": (InspectFlags,),
    "adapters": (AdaptersFlags,),
    "remove": (RemoveFlags,),
    "engine-plan": (EnginePlanFlags,),
    "convert": tuple(typing.get_type_hints(ConvertFlags).values()),  # a composite: one group per field
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_tables_are_the_commands_parameters(name: str) -> None:
    """Every row becomes exactly one parameter, with its flag, default and help; nothing else is there."""
    from phlora_nim.cli.main import app

    params = {p.name: p for p in get_command(app).commands[name].params if "--help" not in p.opts}
    table = [(f, row) for cls in COMMANDS[name] for f, row, _ in rows(cls)]
    assert sorted(params) == sorted(f.name for f, _ in table)
    for f, row in table:
        param = params[f.name]
        if row.decls is not None:
            assert param.opts[0] == row.name and (row.short is None or row.short in param.opts), f.name
            assert param.help == row.help and bool(param.hidden) == row.hidden, f.name
        if f.default is not dataclasses.MISSING:
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            assert param.default == default and not param.required, f.name
        else:
            assert param.required, f.name


@pytest.mark.parametrize(
    ("cls", "values", "flag", "problem"),
    [
        (RankFlags, {"rank": 0}, "--rank", "rank must be positive"),
        (RankFlags, {"energy": 1.5}, "--energy", "energy must be a share"),
        (RankFlags, {"budget_params": -1}, "--budget-params", "parameter budget must be positive"),
        (RankFlags, {"max_rank": 0}, "--max-rank", "max rank must be positive"),
        (FidelityFlags, {"target_kl": 0.0}, "--target-kl", "KL target must be positive"),
        (FidelityFlags, {"target_kl": math.nan}, "--target-kl", "KL target must be positive"),
        (FidelityFlags, {"target_top1": 1.01}, "--target-top1", "top-1 target must be a share"),
        (FidelityFlags, {"target_recovery": 0.0}, "--target-recovery", "recovery target must be a share"),
        (VerifyFlags, {"min_recovery": 1.5}, "--min-recovery", "recovery gate must be a share"),
        (RemoveFlags, {"name": "a", "grace": -1.0}, "--grace", "the grace period must be ≥ 0 seconds"),
        (JobFlags, {"grace": math.nan}, "--grace", "the grace period must be ≥ 0 seconds"),
    ],
)
def test_bounds_are_checked_from_the_row(cls: type, values: dict[str, object], flag: str, problem: str) -> None:
    with pytest.raises(OptionError) as caught:
        build(cls, values)
    err = caught.value
    assert err.where == flag and err.problem.startswith(problem) and err.expected and err.found is not None


def test_a_bound_refused_on_the_command_line_exits_2_naming_the_flag(run_cli, tmp_path: Path) -> None:
    """The row's bound refuses the value before any work (the adapter folder is not even read)."""
    code, _, err = run_cli("prune", tmp_path / "none", "--out", tmp_path / "out", "--max-rank", "0", "--energy", ".5")
    assert code == 2 and "Traceback" not in err
    assert "--max-rank: max rank must be positive; expected an integer ≥ 1; found 0" in err
    assert not (tmp_path / "out").exists()


def test_values_become_typed_frozen_objects() -> None:
    flags = build(PruneFlags, {"adapter_dir": Path("a"), "out": Path("b"), "rank": 3})
    assert flags == PruneFlags(adapter_dir=Path("a"), out=Path("b"))  # rank is not one of its rows
    with pytest.raises(dataclasses.FrozenInstanceError):
        flags.force = True  # type: ignore[misc]
    rank = build(RankFlags, {"rank": 4, "max_rank": 8})
    assert rank.policy().rank == 4 and rank.policy().max_rank == 8


def test_adding_an_option_is_adding_one_row() -> None:
    """A new field with a bound is a new flag of every command taking its class, checked from its row."""

    @dataclass(frozen=True)
    class Toy:
        shape: str = option(
            "--shape", "How the thing is laid out.", default="padded", bound=OneOf("unknown shape", ("padded", "mixed"))
        )
        count: int = option("--count", "How many.", default=1, bound=Bound("count too small", "≥ 1", low=1))
        tags: tuple[str, ...] | None = option("--tag", "A tag; repeat.", default=None)

    seen: list[Toy] = []
    app = typer.Typer()
    app.command("toy")(command(Toy)(seen.append))
    app.command("other")(lambda: None)
    runner = CliRunner()
    shown = runner.invoke(app, ["toy", "--help"], terminal_width=200).output
    assert "--shape" in shown and "How the thing is laid out." in shown and "--tag" in shown
    assert runner.invoke(app, ["toy", "--shape", "mixed", "--tag", "a", "--tag", "b"]).exit_code == 0
    assert seen == [Toy(shape="mixed", count=1, tags=("a", "b"))]
    refused = runner.invoke(app, ["toy", "--shape", "ragged"])
    assert isinstance(refused.exception, OptionError) and refused.exception.where == "--shape"
    assert "padded or mixed" in str(refused.exception)


def test_a_field_that_is_not_a_row_is_refused() -> None:
    @dataclass(frozen=True)
    class Loose:
        plain: int = 1

    with pytest.raises(TypeError, match="not a flag row"):
        rows(Loose)


def test_two_groups_cannot_declare_one_option() -> None:
    with pytest.raises(TypeError, match="options in two groups"):
        command(RankFlags, RankFlags)(lambda a, b: None)
