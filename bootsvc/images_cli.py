"""``bootsvc image ...``: list, verify and add catalog images; import a BFB as delivered; build the TFTP
root.

Owns: the command-line face of ``bootsvc.images`` (the lead mounts the ``image`` group). Exit codes as
everywhere: 1 = the operation failed (e.g. an image failed verification), 2 = bad input.

The QEMU lab's catalog is written by ``bootsvc lab catalog`` (bootsvc/lab/cli.py, with
``write_catalog`` from here): no product module imports the lab, which the wheel does not ship.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import click
import yaml

from bootsvc import bfb as bfb_mod
from bootsvc import images as im
from bootsvc import tftp


def _ctx_config(ctx: click.Context) -> Any:
    obj = ctx.find_root().obj
    return obj.config  # bootsvc.cli.Ctx


def _catalog_path(ctx: click.Context, override: str | None) -> Path:
    if override:
        return Path(override)
    cfg = _ctx_config(ctx)
    return Path(cfg.resolve(cfg.images.catalog))


def _load(path: Path) -> im.Catalog:
    try:
        return im.load_catalog(path)
    except im.CatalogError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


def write_catalog(path: Path, cat: im.Catalog) -> None:
    """Write ``cat`` to ``path`` whole (a temporary file renamed into place), paths relative to its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# bootsvc image catalog (see images/README.md)\n"
                   + yaml.safe_dump(im.dump_catalog(cat, path.parent.resolve()), sort_keys=False))
    tmp.replace(path)


catalog_opt = click.option("--catalog", "catalog_path", type=click.Path(dir_okay=False),
                           help="catalog file (default: config images.catalog)")


@click.group("image")
def image() -> None:
    """Boot images: the catalog of named, versioned images served under /images/."""


@image.command("list")
@catalog_opt
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_cmd(ctx: click.Context, catalog_path: str | None, as_json: bool) -> None:
    """List catalog images (no hashing; see `verify`)."""
    cat = _load(_catalog_path(ctx, catalog_path))
    rows: list[dict[str, Any]] = [{"name": i.name, "version": i.version, "kind": i.kind,
             "files": {f.role: {"name": f.name, "path": str(f.path), "sha256": f.sha256} for f in i.files},
             "default_for": sorted(k for k, v in cat.defaults.items() if cat.resolve(v) == i)} for i in cat.images]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("(no images)")
        return
    for r in rows:
        d = f"  (default for {', '.join(r['default_for'])})" if r["default_for"] else ""
        click.echo(f"{r['name']}:{r['version']}  {r['kind']}{d}")
        for role, f in r["files"].items():
            click.echo(f"    {role:12} /images/{r['name']}/{r['version']}/{f['name']}  {f['sha256'][:16]}...")


@image.command("verify")
@catalog_opt
@click.option("--force", is_flag=True, help="rehash every file (ignore the size+mtime cache)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def verify_cmd(ctx: click.Context, catalog_path: str | None, force: bool, as_json: bool) -> None:
    """Check every file's sha256 (cached by size+mtime). Exit 1 if any image is bad."""
    cfg = _ctx_config(ctx)
    cat = _load(_catalog_path(ctx, catalog_path))
    cat, checks = im.verify(cat, Path(cfg.resolve(cfg.state_dir)) / "image-verify.json", force=force)
    if as_json:
        click.echo(json.dumps([{"image": c.image, "role": c.role, "path": str(c.path), "ok": c.ok,
                                "result": c.reason} for c in checks], indent=2))
    else:
        for c in checks:
            click.echo(f"{'ok ' if c.ok else 'BAD'}  {c.image:40} {c.role:12} {c.reason}")
        click.echo(f"{len(cat.images) - len(cat.bad)} of {len(cat.images)} images verified")
    if cat.bad:
        sys.exit(1)


@image.command("add")
@click.argument("name")
@click.argument("version")
@click.option("--kind", type=click.Choice(im.KINDS), required=True)
@click.option("--file", "files", multiple=True, required=True, metavar="ROLE=PATH",
              help="a file of the image, e.g. kernel=vmlinuz initrd=initrd.gz image=root.img.gz bfb=x.bfb")
@click.option("--args", default="", help="extra kernel arguments for this image's installer")
@click.option("--default-for", type=click.Choice(["dpu", "host", "discovery", "agent"]),
              help="make it the catalog default for that kind of node")
@click.option("--replace", is_flag=True, help="replace an existing name:version")
@catalog_opt
@click.pass_context
def add_cmd(ctx: click.Context, name: str, version: str, kind: str, files: tuple[str, ...], args: str,
            default_for: str | None, replace: bool, catalog_path: str | None) -> None:
    """Hash the files and add NAME VERSION to the catalog."""
    path = _catalog_path(ctx, catalog_path)
    cat = _load(path)
    fm: dict[str, Path] = {}
    for spec in files:
        role, sep, p = spec.partition("=")
        if not sep or not role or not p:
            click.echo(f"error: --file {spec!r}: expected ROLE=PATH", err=True)
            sys.exit(2)
        fm[role] = Path(p)
    try:
        img = im.make_image(name, version, kind, fm, args=args)
        cat = im.add_image(cat, img, replace_existing=replace)
        if default_for:
            cat = im.Catalog(cat.images, {**cat.defaults, default_for: img.ref}, cat.source)
    except im.CatalogError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    write_catalog(path, cat)
    click.echo(f"added {img.ref} ({kind}, {len(img.files)} files) to {path}")


@image.command("import-bfb")
@click.argument("bfb_file", type=click.Path(dir_okay=False))
@click.option("--name", default=None, help="catalog name (default: the file name without .bfb)")
@click.option("--version", "version", default=None, help="catalog version (default: 12 hex digits of its sha256)")
@click.option("--image-version", type=click.IntRange(0, 15), default=None,
              help="which version of the kernel/initramfs images to extract when the BFB has several (default 0)")
@click.option("--store", type=click.Path(file_okay=False), default=None,
              help="where the files go (default: bfb/ next to the catalog); <store>/<name>/<version>/")
@click.option("--in-place", is_flag=True, help="do not copy the whole BFB; the catalog points at BFB_FILE")
@click.option("--default-for-dpu", is_flag=True, help="make it the catalog default for DPUs")
@click.option("--replace", is_flag=True, help="replace an existing name:version")
@catalog_opt
@click.pass_context
def import_bfb_cmd(ctx: click.Context, bfb_file: str, name: str | None, version: str | None,
                   image_version: int | None, store: str | None, in_place: bool, default_for_dpu: bool,
                   replace: bool, catalog_path: str | None) -> None:
    """Register a BFB as delivered: extract its arm64 kernel and installer initramfs (streamed, hashed)
    and add one `bfb` entry (files bfb, kernel, initrd; the BF3 console arguments)."""
    path = _catalog_path(ctx, catalog_path)
    cat = _load(path)
    src = Path(bfb_file)
    root = Path(store) if store else path.parent / "bfb"
    try:
        new, img = im.import_bfb(cat, src, root, name=name, version=version, image_version=image_version,
                                 copy=not in_place, replace_existing=replace)
        if default_for_dpu:
            new = im.Catalog(new.images, {**new.defaults, "dpu": img.ref}, new.source)
    except (im.CatalogError, OSError) as e:
        click.echo(f"error: {e if isinstance(e, im.CatalogError) else f'{src}: {e}'}; nothing was changed", err=True)
        sys.exit(2)
    try:
        write_catalog(path, new)
    except OSError as e:
        kernel = img.file("kernel")
        if kernel is not None:
            shutil.rmtree(kernel.path.parent, ignore_errors=True)
        click.echo(f"error: cannot write {path}: {e.strerror}; nothing was changed", err=True)
        sys.exit(2)
    k, i = img.file("kernel"), img.file("initrd")
    assert k is not None and i is not None
    listing = ", ".join(str(e["name"]) for e in img.meta.get("bfb_images", []))
    click.echo(f"imported {src} as {img.ref} (bfb) into {path}")
    click.echo(f"  images in the BFB: {listing}")
    click.echo(f"  kernel {k.name}  initrd {i.name}  args: {img.args}")
    click.echo(f"next: bootsvc image verify; set a DPU's image to {img.ref}" +
               ("" if default_for_dpu else " or re-run with --default-for-dpu"))


@image.command("bfb-list")
@click.argument("bfb_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def bfb_list_cmd(bfb_file: str, as_json: bool) -> None:
    """List the images in a BFB (like `mlx-mkbfb -d`), checking every header and CRC. Exit 2 if it is
    not a (complete, intact) BFB."""
    try:
        stream = bfb_mod.list_images(bfb_file)
    except (bfb_mod.BfbError, OSError) as e:
        click.echo(f"error: {bfb_file}: {e}", err=True)
        sys.exit(2)
    rows: list[dict[str, Any]] = [{"name": e.name, "id": e.header.image_id, "version": e.header.version,
             "offset": e.offset,
             "length": e.header.length, "crc32": f"{e.header.crc:08x}", "sha256": e.sha256,
             "description": e.description} for e in stream.entries]
    if as_json:
        click.echo(json.dumps({"size": stream.size, "sha256": stream.sha256, "images": rows}, indent=2))
        return
    for r in rows:
        click.echo(f"{r['length']:>12}  {r['name']:24} id {r['id']:<3} crc32 {r['crc32']}  "
                   f"sha256 {r['sha256'][:16]}...")
    click.echo(f"{len(rows)} images, {stream.size} bytes, sha256 {stream.sha256}")


@image.command("tftp-root")
@click.pass_context
def tftp_root_cmd(ctx: click.Context) -> None:
    """Assemble the read-only TFTP root (iPXE from Debian's ipxe package + the catalog's arm64 NBP)."""
    root = tftp.prepare_root(_ctx_config(ctx))
    for p in sorted(root.rglob("*")):
        if p.is_file():
            click.echo(str(p.relative_to(root)))
