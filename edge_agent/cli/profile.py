"""`edge-agent profile ...`: check and list device profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from edge_agent.cli import display
from edge_agent.cli.options import ConfigOption, JsonOption
from edge_agent.config import DEFAULT_PATHS, find_config, load_config
from edge_agent.devices.profile import Profile, load_profile
from edge_agent.errors import ConfigError

profile_app = typer.Typer(help="Check and list device profiles.", no_args_is_help=True)


def _summary(profile: Profile) -> dict[str, object]:
    return {
        "name": profile.name,
        "pin_factory": profile.pin_factory,
        "stations": [s.id for s in profile.stations],
        "products": profile.max_qty(),
        "pins": dict(profile.pins()),
        "on_fault": {s.id: s.on_fault for s in profile.stations if s.fault is not None},
        "timeouts": profile.timeouts.model_dump(),
    }


@profile_app.command()
def check(
    file: Annotated[
        Path | None,
        typer.Argument(help="The profile to check \\[default: the config's profile].", show_default=False),
    ] = None,
    config: ConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Validate a profile: pins used twice, unknown keys, bad products. Exit 2 on an error."""
    if file is None:
        file = load_config(config).profile
    profile = load_profile(file)
    if as_json:
        display.print_json(_summary(profile))
        return
    stations = ", ".join(s.id for s in profile.stations)
    products = ", ".join(f"{p.product_id} (max {p.max_qty})" for p in profile.products)
    pins = ", ".join(f"{name}={pin}" for name, pin in profile.pins())
    display.out.print(
        f"ok: {file}: {profile.name} ({profile.pin_factory} pins); stations {stations}; "
        f"products {products}; pins {pins}"
    )


@profile_app.command("list")
def list_(config: ConfigOption = None, as_json: JsonOption = False) -> None:
    """List the profiles next to the configured one; the configured one is marked."""
    found = find_config(config)
    chosen = load_config(config).profile
    defaults = ", ".join(map(str, DEFAULT_PATHS))
    used = str(found) if found else f"none found ({defaults}), so the defaults"
    paths = sorted(chosen.parent.glob("*.yaml"))
    if not paths:  # an empty table would not say why
        raise ConfigError(
            f"no profiles in {chosen.parent}/, the folder of profile {chosen} (config: {used}); give --config FILE",
            key="--config",
        )
    rows: list[dict[str, object]] = []
    for path in paths:
        try:
            row = _summary(load_profile(path))
            row["error"] = None
        except ConfigError as error:
            row = {"name": path.stem, "error": str(error)}
        row["file"] = str(path)
        row["configured"] = path.resolve() == chosen.resolve()
        rows.append(row)
    if as_json:
        display.print_json(rows)
        return
    display.out.print(Text(f"config: {used}; profile: {chosen}"))
    # File names whole and on one line (they are what a user types next); the folder once,
    # in the title; the products and errors wrap to whatever width is left.
    table = Table(
        title=f"Profiles in {chosen.parent}/",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("")
    table.add_column("file", no_wrap=True, min_width=max(len(path.name) for path in paths))
    for heading in ("name", "pins", "stations", "products / error"):
        table.add_column(heading)
    for row, path in zip(rows, paths, strict=True):
        detail = row["error"] or ", ".join(f"{p} (max {n})" for p, n in row["products"].items())  # type: ignore[attr-defined]
        table.add_row(
            "*" if row["configured"] else "",
            path.name,
            str(row["name"]),
            str(row.get("pin_factory", "-")),
            ", ".join(row.get("stations", [])),  # type: ignore[arg-type]
            str(detail),
        )
    display.out.print(table)
