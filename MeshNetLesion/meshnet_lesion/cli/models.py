"""``meshnet-lesion models``: list, show, fetch, import, remove, clear-cache."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError, MeshNetLesionError
from .options import open_registry


def add_parser(commands) -> None:
    models = commands.add_parser("models", help="list, fetch, import or remove models")
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="models and sample scans, and whether they are on this machine")
    listing.add_argument("--json", action="store_true", help="print the registry entries as JSON")
    listing.set_defaults(handler=list_models)
    show = actions.add_parser("show", help="print a model card")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="the registry entry as JSON")
    show.set_defaults(handler=show_model)
    fetch = actions.add_parser("fetch", help="make sure an entry's files are on this machine; print their paths")
    fetch.add_argument("ids", nargs="+", metavar="ID")
    fetch.set_defaults(handler=fetch_models)
    importer = actions.add_parser("import", help="import a local model folder (brainchop, TensorFlow.js or ours)")
    importer.add_argument("folder", type=Path)
    importer.add_argument("--id", dest="entry_id")
    importer.add_argument("--title")
    importer.add_argument("--task", default="lesion")
    importer.add_argument("--tile", type=int, metavar="EDGE",
                          help="run it on EDGE³ tiles overlapping by half (≥ 16), e.g. a student distilled on "
                               "crops of that edge, which calls false lesion on context it never saw")
    importer.set_defaults(handler=import_model)
    remove = actions.add_parser("remove", help="remove an imported model or a model's downloaded files")
    remove.add_argument("id")
    remove.set_defaults(handler=remove_model)
    clear = actions.add_parser("clear-cache", help="delete all downloaded files (imported models stay)")
    clear.set_defaults(handler=clear_cache)


def list_models(args: argparse.Namespace) -> int:
    from ..registry import entries_json

    registry = open_registry()
    entries = registry.entries()
    if args.json:
        print(json.dumps(entries_json(entries), indent=1))
        return 0
    default = registry.default_model().id
    print(f"  {'ID':<26} {'KIND':<6} {'TASK':<17} {'SOURCE':<8} {'FILES':<18} TITLE")
    for entry in entries:
        try:
            state = "here" if registry.is_available(entry) else f"download {registry.download_size(entry) / 1e6:.1f} MB"
        except MeshNetLesionError as error:       # one damaged entry must not hide the others
            state = f"damaged: {error}"
        mark = "*" if entry.id == default else " "
        print(f"{mark} {entry.id:<26} {entry.kind:<6} {entry.task or '-':<17} {entry.origin:<8} {state:<18} "
              f"{entry.title}")
    print("* the default lesion model; details: meshnet-lesion models show ID")
    for name, reason in registry.damaged_imports().items():
        print(f"! damaged import {name}: {reason} (remove it: meshnet-lesion models remove {name})")
    return 0


def show_model(args: argparse.Namespace) -> int:
    from ..registry import entries_json

    registry = open_registry()
    entry = registry.get(args.id)
    if args.json:
        print(json.dumps(entries_json([entry])[0], indent=1))
        return 0
    card = entry.card
    print(f"{entry.id}: {entry.title}")
    rows = [("task", entry.task), ("version", card.get("version")), ("input", card.get("input")),
            ("input convention", card.get("input_convention")), ("members", ", ".join(entry.runtime.members)),
            ("description", card.get("description")), ("trained on", card.get("training_data")),
            ("license", card.get("license")), ("source", card.get("source")), ("citation", card.get("citation"))]
    for name, value in rows:
        if value:
            print(f"  {name + ':':<18} {value}")
    def figures(heading: str, key: str) -> None:
        print(heading)
        for item in card.get(key) or []:
            print(f"    - {item['name']}: {item['value']} ({item.get('source', 'no source given')})")

    figures(f"  {'metrics:':<18} {'' if card.get('metrics') else 'none published'}".rstrip(), "metrics")
    if card.get("metrics_note"):
        print(f"  {'note:':<18} {card['metrics_note']}")
    if card.get("default_reason"):
        print(f"  {'why the default:':<18} {card['default_reason']}")
    if card.get("measured"):
        print("  measured by this project (not a published evaluation):")
        print(f"    {card['measured']['summary']}")
        print(f"    every figure, with its command and machine: {card['measured']['results']} (in the repository)")
    if card.get("standardization_note"):
        print(f"  {'standardisation:':<18} {card['standardization_note']}")
    if entry.kind == "model":
        here = registry.is_available(entry)
        print(f"  {'files:':<18} {'on this machine' if here else f'{registry.download_size(entry) / 1e6:.1f} MB to download'}")
    return 0


def fetch_models(args: argparse.Namespace) -> int:
    registry = open_registry()
    for entry_id in args.ids:
        for path in registry.fetch_all(entry_id):
            print(path)
    return 0


def import_model(args: argparse.Namespace) -> int:
    if args.tile is not None and args.tile < 16:
        raise InputError(f"--tile must be at least 16 voxels, not {args.tile}")
    card = {"inference": {"tile": args.tile}} if args.tile else None
    entry = open_registry().import_folder(args.folder, args.entry_id, args.title, args.task, card)
    print(f"imported {entry.id}: {entry.card.get('description', '')}")
    return 0


def remove_model(args: argparse.Namespace) -> int:
    print(open_registry().remove(args.id))
    return 0


def clear_cache(args: argparse.Namespace) -> int:
    registry = open_registry()
    registry.clear_cache()
    print(f"cleared {registry.cache_dir / 'files'}")
    return 0
