"""``python -m foundry_core``: inspect and verify archives, describe this machine.

Exit codes: 0 ok, 1 the archive is bad or incompatible, 2 usage error. Errors are one line on stderr.
The settings (``foundry_core.options``) are read once, in :func:`main`, and handed to each command.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

import msgspec

from foundry_core import fingerprint as fpr
from foundry_core import trust
from foundry_core.archive import CONTAINER_VERSION, Archive, blob_names
from foundry_core.errors import FoundryError, UntrustedArchive
from foundry_core.options import Options
from foundry_core.restore import check_archive_offline
from foundry_core.schema import rank_images
from foundry_core.store import STORE_DIRNAME, ImageStore, image_bytes, pack_archive, store_usage

log = logging.getLogger("foundry_core.cli")

EXIT_OK, EXIT_BAD, EXIT_USAGE = 0, 1, 2
CATEGORIES = ("images", "graph nodes", "graph payload", "graph attrs", "templates", "snapshots", "other")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m foundry_core",
        description="Inspect and verify Foundry archives (persisted CUDA graphs with their execution context).",
        epilog="Exit codes: 0 ok, 1 archive bad or incompatible, 2 usage error.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log progress (-v) or debug detail (-vv)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect",
        help="summarise an archive",
        description="Print what an archive holds: schema, fingerprint, arena, blob sizes by category, graphs, "
        "kernel images. Reads only the header and manifest (blob contents are not checked; use verify).",
    )
    inspect.add_argument("archive", metavar="ARCHIVE", help="path of the .foundry archive")
    inspect.add_argument("--json", action="store_true", help="print the summary and the full manifest as JSON")

    verify = commands.add_parser(
        "verify",
        help="check an archive's integrity and its compatibility with this machine",
        description="Check the header, the manifest and every blob's sha256 (and decompression), the graph tables, "
        "allocation trace and outputs as LOAD checks them (for every rank of a rank template), that LOAD would "
        "trust the file (not writable by other users, or signed when FOUNDRY_ARCHIVE_KEY is set), then compare "
        "the saved fingerprint with this machine's when a CUDA GPU is present.",
    )
    verify.add_argument("archive", metavar="ARCHIVE", help="path of the .foundry archive")
    verify.add_argument(
        "--key",
        help="the caller key the archive must have been saved for (e.g. 'qwen3-8b|tp1|rank0'); "
        "checked even without a GPU",
    )
    verify.add_argument(
        "--no-machine-check",
        action="store_true",
        help="skip comparing GPU, driver and software versions with this machine",
    )
    verify.add_argument("--device", type=int, default=0, help="CUDA device to compare against (default 0)")

    pack = commands.add_parser(
        "pack",
        help="export an archive as one self-contained file",
        description="Write a copy of ARCHIVE with every kernel image from the host's image store embedded, so the "
        "single file can be copied to another machine. Images are verified on the way. ARCHIVE must be one LOAD "
        "would trust (not writable by other users, or signed when FOUNDRY_ARCHIVE_KEY is set).",
    )
    pack.add_argument("archive", metavar="ARCHIVE", help="path of the .foundry archive")
    pack.add_argument("output", metavar="OUTPUT", help="path of the self-contained archive to write")

    gc = commands.add_parser(
        "gc",
        help="remove kernel images no archive uses from a directory's image store",
        description="Delete images in DIR/foundry-images that no DIR/*.foundry archive refers to, and stale "
        "temporary files. Files younger than --grace are spared (a SAVE in progress writes its images before its "
        "archive). Refuses to delete anything while an archive in DIR cannot be read.",
    )
    gc.add_argument("directory", metavar="DIR", help="directory holding the archives and their foundry-images store")
    gc.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                    help="spare unreferenced files modified within this many seconds (default 3600)")
    gc.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")

    sign = commands.add_parser(
        "sign",
        help="sign an archive with the deployment's key (for shared archive directories)",
        description="Write ARCHIVE.hmac, an HMAC-SHA256 made with the key in FOUNDRY_ARCHIVE_KEY or the file named "
        "by FOUNDRY_ARCHIVE_KEY_FILE. With a key configured, LOAD accepts only archives signed with it, and then "
        "also from directories other users can write. The archive must belong to this user (or root), writable by "
        "nobody else, and pass verify's checks before it is signed.",
    )
    sign.add_argument("archive", metavar="ARCHIVE", help="path of the .foundry archive")

    machine = commands.add_parser(
        "machine",
        help="print this machine's fingerprint fields",
        description="Print the fields an archive must match on this machine, or why there is no usable GPU.",
    )
    machine.add_argument("--device", type=int, default=0, help="CUDA device to describe (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on usage errors
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        options = Options.from_env()
        commands = {"inspect": cmd_inspect, "verify": cmd_verify, "pack": cmd_pack, "gc": cmd_gc, "sign": cmd_sign,
                    "machine": cmd_machine}
        return commands[args.command](args, options)
    except FoundryError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # `inspect | head`: nothing more to say
        return EXIT_OK
    except Exception as err:  # a bug, not bad input: still one line unless -v asks for the traceback
        log.debug("traceback", exc_info=True)
        print(f"internal error: {type(err).__name__}: {err} (run with -vv for the traceback)", file=sys.stderr)
        return EXIT_BAD


# -- inspect -----------------------------------------------------------------------------------------------


def cmd_inspect(args, options: Options) -> int:
    with Archive.open(args.archive, options) as archive:
        summary = summarise(archive)
        if args.json:
            doc = {"summary": summary, "manifest": msgspec.to_builtins(archive.manifest)}
            sys.stdout.write(msgspec.json.format(msgspec.json.encode(doc).decode()) + "\n")
        else:
            sys.stdout.write(render(summary))
    return EXIT_OK


def summarise(archive) -> dict:
    """The facts ``inspect`` prints, as plain data."""
    m = archive.manifest
    category_of = blob_names(m)
    categories = {c: {"count": 0, "stored": 0, "size": 0} for c in CATEGORIES}
    seen: dict[str, set] = defaultdict(set)  # category -> stored records already counted (dedupe)
    for name, blob in m.blobs.items():
        category = category_of.get(name, "other")
        if blob.offset in seen[category]:
            continue
        seen[category].add(blob.offset)
        entry = categories[category]
        entry["count"] += 1
        entry["stored"] += blob.stored_size
        entry["size"] += blob.size
    unique = {b.offset: b for b in m.blobs.values()}
    return {
        "path": str(archive.path),
        "file_size": archive.file_size,
        "container_version": CONTAINER_VERSION,
        "schema_version": m.schema_version,
        "created_utc": m.created_utc,
        "fingerprint": msgspec.to_builtins(m.fingerprint),
        "arena": msgspec.to_builtins(m.arena),
        "blobs": {
            "names": len(m.blobs),
            "records": len(unique),
            "stored": sum(b.stored_size for b in unique.values()),
            "size": sum(b.size for b in unique.values()),
            "by_category": categories,
        },
        "graphs": [
            {
                "key": g.key,
                "nodes": m.templates[g.template].num_nodes,
                "kernel_nodes": g.num_kernel_nodes,
                "template": g.template,
                "outputs": len(g.outputs),
                "child": g.is_child,
            }
            for g in m.graphs
        ],
        "images": [
            {"sha256": im.sha256, "size": im.size, "kernels": len(im.kernels), "in_store": im.in_store}
            for im in m.images
        ],
        "image_store": store_usage(archive),
        "functions": len(m.functions),
        "templates": len(m.templates),
        "snapshots": len(m.snapshots),
        "num_events": m.num_events,
        "extra": dict(m.extra),
        "slots": {op: sum(1 for x in m.slots if x.op == op) for op in sorted({x.op for x in m.slots})},
        "ranks": None if m.ranks is None else {
            "world_size": m.ranks.world_size,
            "layout": dict(m.ranks.layout),
            "noise_bytes": m.ranks.noise_bytes,
            "deltas": {d.rank: {"patches": len(d.patches), "bytes": sum(len(p.data) for p in d.patches),
                                "base": d.base,
                                "graphs": len({p.graph for p in d.patches if p.graph >= 0}),
                                "snapshots": len({p.snapshot for p in d.patches if p.snapshot >= 0})}
                       for d in m.ranks.deltas},
            "variants": {v.rank: {"graphs": len(v.manifest.graphs), "images": len(v.manifest.images),
                                  "functions": len(v.manifest.functions)} for v in m.ranks.variants},
        },
    }


def render(s: dict) -> str:
    fp, arena, blobs = s["fingerprint"], s["arena"], s["blobs"]
    lines = [
        f"archive     {s['path']} ({_size(s['file_size'])}, container v{s['container_version']})",
        f"schema      {s['schema_version']}, created {s['created_utc']}",
        "saved for   " + " ".join(f"{k}={fp[k]!r}" for k in fp if k != "key"),
        f"key         {fp['key']!r}",
        f"arena       base 0x{arena['base']:x}, reserved {_size(arena['size'])}, granularity "
        f"{_size(arena['granularity'])}, capture range [0x{arena['base'] + arena['capture_start']:x}, "
        f"0x{arena['base'] + arena['capture_end']:x}) = {_size(arena['capture_end'] - arena['capture_start'])}",
        f"contents    {len(s['graphs'])} graphs, {s['templates']} templates, {len(s['images'])} images, "
        f"{s['functions']} kernels, {s['snapshots']} snapshots, {s['num_events']} events",
        f"blobs       {blobs['names']} names in {blobs['records']} records, {_size(blobs['stored'])} stored "
        f"({_size(blobs['size'])} uncompressed)",
    ]
    lines += _table(
        ["category", "blobs", "stored", "uncompressed"],
        [
            [c, v["count"], _size(v["stored"]), _size(v["size"])]
            for c, v in s["blobs"]["by_category"].items()
            if v["count"]
        ],
    )
    u = s["image_store"]
    if u["store_images"]:
        lines.append(
            f"image store {u['store']}: {u['store_images']} images of this archive, "
            f"{_size(u['shared_bytes'])} shared with other archives there ({u['shared_images']} images), "
            f"{_size(u['own_bytes'])} own ({u['own_images']} images)"
            + (f"; {u['missing_images']} MISSING" if u["missing_images"] else "")
            + (f"; {u['unreadable_archives']} unreadable archives not counted" if u["unreadable_archives"] else "")
        )
    if u["embedded_images"]:
        lines.append(f"embedded    {u['embedded_images']} images, {_size(u['embedded_bytes'])} in the file")
    if s["extra"]:
        lines.append("extra       " + " ".join(f"{k}={v!r}" for k, v in sorted(s["extra"].items())))
    if s.get("slots"):
        lines.append("slots       " + ", ".join(f"{n} {op}" for op, n in s["slots"].items())
                     + " (placeholders filled at LOAD on the live communicator)")
    if s.get("ranks"):
        r = s["ranks"]
        layout = " ".join(f"{k}={v}" for k, v in r["layout"].items())
        lines.append(f"ranks       one template for {r['world_size']} ranks ({layout}); "
                     f"noise masked {_size(r['noise_bytes'])}")
        rows = [(rank, f"delta {d['patches']} patches, {_size(d['bytes'])} in {d['graphs']} graphs and "
                       f"{d['snapshots']} snapshots" + (f", on rank {d['base']}'s graphs" if d.get("base") else ""))
                for rank, d in r["deltas"].items()]
        rows += [(rank, f"variant: graphs of its own ({v['graphs']} graphs, {v['images']} kernel images, "
                        f"{v['functions']} kernels)") for rank, v in r.get("variants", {}).items()]
        for rank, what in sorted(rows):
            lines.append(f"  rank {rank}    {what}")
    lines.append("")
    lines.append(f"graphs ({len(s['graphs'])})")
    lines += _table(
        ["key", "nodes", "kernel nodes", "template", "outputs"],
        [
            [g["key"] + (" (child)" if g["child"] else ""), g["nodes"], g["kernel_nodes"], g["template"], g["outputs"]]
            for g in s["graphs"]
        ],
    )
    lines.append("")
    lines.append(f"images ({len(s['images'])})")
    lines += _table(
        ["sha256", "size", "kernels", "where"],
        [[im["sha256"][:16], _size(im["size"]), im["kernels"], "store" if im["in_store"] else "file"]
         for im in s["images"]],
    )
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list]) -> list[str]:
    if not rows:
        return ["  (none)"]
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    out = []
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]
        out.append("  " + "  ".join([first, *rest]).rstrip())
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


# -- verify ------------------------------------------------------------------------------------------------


def cmd_verify(args, options: Options) -> int:
    with Archive.open(args.archive, options) as archive:
        records = archive.verify_all(progress=args.verbose > 0 and sys.stderr.isatty())
        saved = archive.manifest.fingerprint
        in_store = list({im.sha256: im for im in rank_images(archive.manifest) if im.in_store}.values())
        for im in in_store:
            image_bytes(archive, im)
        print(f"ok: {args.archive}: header, manifest and {records} blob records intact"
              + (f"; {len(in_store)} images in the image store intact" if in_store else ""))
        check_archive_offline(archive)
        print(f"ok: graph tables, trace and outputs pass LOAD's checks{_for_ranks(archive)}")
        print(f"ok: trusted for LOAD: {trust.check_archive(archive, trust.configured_key(options))}")

    if args.key is not None:
        expected = msgspec.structs.replace(saved, key=args.key)
        fpr.check_compatible(saved, expected, args.archive)
        print(f"ok: saved for key {args.key!r}")

    if args.no_machine_check:
        print("machine check skipped (--no-machine-check)")
        return EXIT_OK
    reason = fpr.gpu_unavailable_reason(args.device)
    if reason is not None:
        print(f"machine check skipped: no CUDA GPU usable here ({reason})")
        return EXIT_OK
    current = fpr.current_fingerprint(key=saved.key if args.key is None else args.key, device=args.device)
    fpr.check_compatible(saved, current, args.archive)
    print(f"ok: compatible with this machine ({current.gpu_name}, driver {current.driver_version})")
    return EXIT_OK


# -- pack / gc ---------------------------------------------------------------------------------------------


def cmd_pack(args, options: Options) -> int:
    out = pack_archive(args.archive, args.output, options)
    print(f"ok: wrote {out} ({_size(out.stat().st_size)}, self-contained)")
    return EXIT_OK


def cmd_gc(args, options: Options) -> int:
    directory = Path(args.directory)
    if not directory.is_dir():
        print(f"error: {directory}: not a directory", file=sys.stderr)
        return EXIT_USAGE
    r = ImageStore(directory / STORE_DIRNAME).gc(grace_s=args.grace, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(r.removed)} unreferenced images ({_size(r.freed_bytes)}) and {r.temp_removed} stale "
          f"temporary files; kept {r.kept} referenced, spared {r.spared_recent} recent")
    return EXIT_OK


# -- sign --------------------------------------------------------------------------------------------------


def cmd_sign(args, options: Options) -> int:
    key = trust.configured_key(options)
    if key is None:
        raise UntrustedArchive(f"no key to sign with: set {trust.KEY_ENV} or {trust.KEY_FILE_ENV}")
    with Archive.open(args.archive, options) as archive:
        trust.check_private(archive, to_sign=True)
        records = archive.verify_all(progress=args.verbose > 0 and sys.stderr.isatty())
        check_archive_offline(archive)
        target = trust.write_signature(archive.path, archive.header, key)
    print(f"ok: {args.archive}: {records} blob records intact, LOAD's checks pass{_for_ranks(archive)}; signature "
          f"written to {target}")
    return EXIT_OK


def _for_ranks(archive) -> str:
    ranks = archive.manifest.ranks
    return f" for each of its {ranks.world_size} ranks" if ranks is not None else ""


# -- machine -----------------------------------------------------------------------------------------------


def cmd_machine(args, options: Options) -> int:
    print(fpr.describe_machine(args.device))
    return EXIT_OK
