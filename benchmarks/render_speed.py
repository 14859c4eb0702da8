"""Speed of DECA's physical buffers: diffrig's BufferRenderer, optionally beside the official one.

Renders a batch of FLAME-size meshes (head_template.obj topology when DECA's public files are
found, else a procedural mesh with FLAME's counts: 5023 vertices, 9976 faces) and reports images/s.

    python benchmarks/render_speed.py                       # CUDA if available, else CPU
    python benchmarks/render_speed.py --device cpu --threads 2
    python benchmarks/render_speed.py --official_repo /path/to/diffusion-rig   # or DECA

``--official_repo`` loads ``decalib/utils/renderer.py`` from the given checkout (nothing of it is
copied into diffrig) and times its ``SRenderY`` on the same inputs. Its default rasterizer is
pytorch3d when importable; otherwise, on CUDA, DECA's "standard" CUDA rasterizer is compiled from
the checkout's ``decalib/utils/rasterizer`` sources into a temporary folder (with the one change
current PyTorch needs: ``.type()`` -> ``.scalar_type()`` in the dispatch macros).
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch

from diffrig.deca.render import BufferRenderer, orthographic_project

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OBJ = REPO_ROOT.parent / "shared" / "deca_public" / "head_template.obj"
FLAME_VERTICES, FLAME_FACES = 5023, 9976


def procedural_flame_size_mesh() -> SimpleNamespace:
    """A closed head-sized ellipsoid with FLAME's vertex and face counts and per-vertex UVs.

    43 rings x 116 columns + 2 poles = 4990 vertices and 2 * 43 * 116 = 9976 faces; 33 extra
    vertices (unused, at the top pole) bring the count to FLAME's 5023.
    """
    rings, columns = 43, 116
    verts, uvs = [[0.0, 1.0, 0.0]], [[0.5, 1.0]]
    for i in range(1, rings + 1):
        theta = math.pi * i / (rings + 1)
        for j in range(columns):
            phi = 2 * math.pi * j / columns
            verts.append([math.sin(theta) * math.cos(phi), math.cos(theta), math.sin(theta) * math.sin(phi)])
            uvs.append([j / columns, 1 - i / (rings + 1)])
    verts.append([0.0, -1.0, 0.0])
    uvs.append([0.5, 0.0])
    bottom = len(verts) - 1
    ring = lambda i, j: 1 + (i - 1) * columns + j % columns  # noqa: E731
    faces = []
    for j in range(columns):
        faces += [[0, ring(1, j + 1), ring(1, j)], [bottom, ring(rings, j), ring(rings, j + 1)]]
    for i in range(1, rings):
        for j in range(columns):
            faces.append([ring(i, j), ring(i, j + 1), ring(i + 1, j)])
            faces.append([ring(i, j + 1), ring(i + 1, j + 1), ring(i + 1, j)])
    verts += [[0.0, 1.0, 0.0]] * (FLAME_VERTICES - len(verts))
    uvs += [[0.5, 1.0]] * (FLAME_VERTICES - len(uvs))
    vertices = torch.tensor(verts) * torch.tensor([0.08, 0.12, 0.1])  # metres, like FLAME's head
    faces_t = torch.tensor(faces)
    assert vertices.shape[0] == FLAME_VERTICES and faces_t.shape[0] == FLAME_FACES
    return SimpleNamespace(vertices=vertices, faces=faces_t, uvcoords=torch.tensor(uvs), uvfaces=faces_t.clone())


def load_mesh(obj: Path | None) -> tuple[SimpleNamespace, str]:
    """The benchmark mesh and a description of where it came from."""
    path = obj if obj is not None else (DEFAULT_OBJ if DEFAULT_OBJ.exists() else None)
    if path is None:
        return procedural_flame_size_mesh(), "procedural (5023 v / 9976 f)"
    from diffrig.deca.formats import read_obj

    mesh = read_obj(path)
    return (
        SimpleNamespace(
            vertices=torch.as_tensor(mesh.vertices, dtype=torch.float32),
            faces=torch.as_tensor(mesh.faces),
            uvcoords=torch.as_tensor(mesh.uvcoords, dtype=torch.float32),
            uvfaces=torch.as_tensor(mesh.uvfaces),
        ),
        f"{path} ({len(mesh.vertices)} v / {len(mesh.faces)} f)",
    )


def _rotations(yaw: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
    cy, sy, cp, sp = yaw.cos(), yaw.sin(), pitch.cos(), pitch.sin()
    zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).view(-1, 3, 3)
    rx = torch.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1).view(-1, 3, 3)
    return rx @ ry


def make_inputs(mesh: SimpleNamespace, batch: int, seed: int = 0, uv_size: int = 256) -> dict[str, torch.Tensor]:
    """DECA-like inputs: posed world vertices, cams filling the image like DECA's crops, SH lights."""
    g = torch.Generator().manual_seed(seed)
    v = mesh.vertices - (mesh.vertices.amax(0) + mesh.vertices.amin(0)) / 2
    v = v / v.abs().max() * 0.13
    yaw = (torch.rand(batch, generator=g) - 0.5) * 1.2
    pitch = (torch.rand(batch, generator=g) - 0.5) * 0.6
    vertices = v[None] @ _rotations(yaw, pitch).transpose(1, 2)
    vertices = vertices + 0.0008 * torch.randn(vertices.shape, generator=g)
    cam = torch.stack([7 + 2 * torch.rand(batch, generator=g), 0.04 * (torch.rand(batch, generator=g) - 0.5),
                       0.04 * (torch.rand(batch, generator=g) - 0.5)], 1)
    lights = 0.3 * torch.randn(batch, 9, 3, generator=g)
    lights[:, 0] += 3.0
    albedo = torch.nn.functional.avg_pool2d(torch.rand(batch, 3, uv_size, uv_size, generator=g), 9, 1, 4)
    return {"vertices": vertices, "cam": cam, "lights": lights, "albedo": albedo}


def _stub_if_missing(name: str, **attributes) -> None:
    """Let the official modules import where optional packages (cv2, skimage, ...) are absent."""
    try:
        importlib.import_module(name)
        return
    except Exception:
        pass
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for key, value in attributes.items():
        setattr(sys.modules[name], key, value)


def import_official_renderer(repo: Path):
    """The official ``decalib.utils.renderer`` module of a DECA / diffusion-rig checkout."""
    utils_dir = Path(repo) / "decalib" / "utils"
    if not (utils_dir / "renderer.py").exists():
        raise SystemExit(f"{utils_dir / 'renderer.py'} not found: pass the root of a DECA or diffusion-rig checkout")
    _stub_if_missing("cv2")
    _stub_if_missing("skimage.io", imsave=lambda *a, **k: None, imread=lambda *a, **k: None)
    _stub_if_missing("scipy.ndimage.morphology")
    _stub_if_missing("imageio")
    package = "official_decalib_utils"
    if package not in sys.modules:
        module = types.ModuleType(package)
        module.__path__ = [str(utils_dir)]
        sys.modules[package] = module
    return importlib.import_module(f"{package}.renderer")


def build_standard_rasterizer(repo: Path, device: torch.device, verbose: bool = False):
    """Compile DECA's CUDA rasterizer from the checkout into a temporary folder; returns the module."""
    from torch.utils.cpp_extension import load

    if device.type != "cuda":
        raise SystemExit("the official standard rasterizer needs CUDA (and pytorch3d is not installed)")

    source_dir = Path(repo) / "decalib" / "utils" / "rasterizer"
    build_dir = Path(tempfile.mkdtemp(prefix="deca_standard_rasterizer_"))
    sources = []
    for name in ("standard_rasterize_cuda.cpp", "standard_rasterize_cuda_kernel.cu"):
        text = (source_dir / name).read_text().replace(".type()", ".scalar_type()")
        (build_dir / name).write_text(text)
        sources.append(str(build_dir / name))
    return load(name="standard_rasterize_cuda", sources=sources, build_directory=str(build_dir), verbose=verbose)


def official_renderer(repo: Path, obj_path: Path, image_size: int, device: torch.device, rasterizer: str = "auto"):
    """(SRenderY instance, rasterizer name) from the official code at ``repo``."""
    module = import_official_renderer(repo)
    if rasterizer == "auto":
        try:
            importlib.import_module("pytorch3d")
            rasterizer = "pytorch3d"
        except ImportError:
            rasterizer = "standard"
    if rasterizer == "pytorch3d":
        module.set_rasterizer("pytorch3d")
    else:
        module.standard_rasterize = build_standard_rasterizer(repo, device).standard_rasterize
        module.load_obj = importlib.import_module(module.__package__ + ".util").load_obj

        class StandardRasterizer(module.StandardRasterizer):
            # diffusion-rig's SRenderY asks for return_bary, which this class does not take.
            def forward(self, vertices, faces, attributes=None, h=None, w=None, return_bary=False):
                out = super().forward(vertices, faces, attributes, h, w)
                return (out, None, None) if return_bary else out

        module.StandardRasterizer = StandardRasterizer
    renderer = module.SRenderY(image_size, str(obj_path), uv_size=256, rasterizer_type=rasterizer)
    return renderer.to(device), rasterizer


def write_obj(mesh: SimpleNamespace, path: Path) -> None:
    """Minimal OBJ (v, vt, f v/vt) that the official loaders read."""
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in mesh.vertices.tolist()]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in mesh.uvcoords.tolist()]
    for face, uvface in zip(mesh.faces.tolist(), mesh.uvfaces.tolist()):
        lines.append("f " + " ".join(f"{a + 1}/{b + 1}" for a, b in zip(face, uvface)))
    path.write_text("\n".join(lines) + "\n")


def images_per_second(render, batch: int, device: torch.device, warmup: int, iters: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            render()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            render()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return batch * iters / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 on CUDA, 1 on CPU")
    parser.add_argument("--iters", type=int, default=None, help="default: 20 on CUDA, 3 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--obj", type=Path, default=None, help="mesh (default: DECA's head_template.obj if found)")
    parser.add_argument("--official_repo", type=Path, default=None, help="DECA / diffusion-rig checkout to compare")
    parser.add_argument("--official_rasterizer", choices=["auto", "pytorch3d", "standard"], default="auto")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    iters = args.iters if args.iters is not None else (20 if on_cuda else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    mesh, source = load_mesh(args.obj)
    inputs = {k: v.to(device) for k, v in make_inputs(mesh, args.batch).items()}
    screen = orthographic_project(inputs["vertices"], inputs["cam"])
    renderer = BufferRenderer(mesh, args.size).to(device)

    def ours():
        return renderer(inputs["vertices"], screen, inputs["albedo"], inputs["lights"])

    name = torch.cuda.get_device_name(device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; mesh: {source}; batch {args.batch} at {args.size}x{args.size}")
    coverage = ours()["alpha"].mean().item()
    ours_rate = images_per_second(ours, args.batch, device, warmup, iters)
    print(f"diffrig BufferRenderer: {ours_rate:.1f} images/s (coverage {coverage:.1%})")

    if args.official_repo is not None:
        with tempfile.TemporaryDirectory() as tmp:
            obj_path = args.obj or (DEFAULT_OBJ if DEFAULT_OBJ.exists() else Path(tmp) / "mesh.obj")
            if not obj_path.exists():
                write_obj(mesh, obj_path)
            official, kind = official_renderer(
                args.official_repo, obj_path, args.size, device, args.official_rasterizer
            )

            def theirs():
                # SRenderY shifts the depth of its input in place: give it a fresh copy.
                return official(inputs["vertices"], screen.clone(), inputs["albedo"], inputs["lights"])

            official_rate = images_per_second(theirs, args.batch, device, warmup, iters)
        print(f"official SRenderY ({kind} rasterizer): {official_rate:.1f} images/s")
        print(f"ratio diffrig / official: {ours_rate / official_rate:.2f}x")


if __name__ == "__main__":
    main()
