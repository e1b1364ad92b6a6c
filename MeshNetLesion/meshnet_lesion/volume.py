"""A scalar volume as the core sees it: a voxel array in (i, j, k) order and a voxel-to-RAS affine.

Every front end converts to this before anything else happens: files through :func:`load_volume`
(NIfTI/MGH/Analyze via nibabel, NRRD via pynrrd), Slicer volume nodes through
:meth:`Volume.from_kji` (Slicer's ``arrayFromVolume`` is (k, j, i)).
"""
from __future__ import annotations

import errno
import gzip
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

NIFTI_INTENT_LABEL = 1002
# More voxels than any MRI has (1000³): a header claiming more is damaged or hostile, and is refused
# before its data is read.
MAX_VOXELS = 1_000_000_000
_NRRD_SUFFIXES = (".nrrd", ".nhdr")
# NRRD "space" names and the sign flips that take that space to RAS.
_NRRD_SPACE_TO_RAS = {
    "right-anterior-superior": (1, 1, 1),
    "ras": (1, 1, 1),
    "left-posterior-superior": (-1, -1, 1),
    "lps": (-1, -1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "las": (-1, 1, 1),
}


@dataclass(frozen=True)
class Volume:
    """A 3D scalar image.

    ``array`` is indexed (i, j, k), the order of NIfTI and nibabel; ``affine`` maps a voxel index
    (i, j, k, 1) to RAS millimetres, as Slicer's IJKToRAS matrix does.
    """

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise InputError(f"the voxel-to-world matrix must be 4x4, not {affine.shape}")
        object.__setattr__(self, "affine", affine)

    @classmethod
    def from_kji(cls, array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> Volume:
        """Build from a Slicer-style (k, j, i) array and IJKToRAS matrix (the array is not copied)."""
        return cls(np.asarray(array_kji).transpose(2, 1, 0), ijk_to_ras)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (|det| of the affine's 3x3 part, mm³ / 1000)."""
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0


def left_right_axis(affine: np.ndarray) -> int:
    """The array axis that runs left to right: the one whose voxel direction is most along RAS x."""
    return int(np.abs(affine[0, :3]).argmax())


def validate(volume: Volume, name: str = "input") -> None:
    """Raise :class:`InputError` with one clear sentence if ``volume`` cannot be segmented."""
    array = volume.array
    if array.ndim != 3:
        raise InputError(f"{name} must be a 3D scalar volume, but it has shape {array.shape}")
    if min(array.shape) < 2:
        raise InputError(f"{name} is 2D (shape {array.shape}); MeshNet needs a 3D volume")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == np.bool_):
        raise InputError(f"{name} has voxel type {array.dtype}; a real-valued scalar volume is needed")
    if not np.all(np.isfinite(volume.affine)):
        raise InputError(f"{name} has a non-finite voxel-to-world matrix")
    if abs(np.linalg.det(volume.affine[:3, :3])) < 1e-9:
        raise InputError(f"{name} has a degenerate voxel-to-world matrix (zero voxel volume)")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InputError(f"{name} contains {bad} NaN or infinite voxels")
    lo, hi = array.min(), array.max()
    if lo == hi:
        raise InputError(f"{name} is constant (every voxel is {lo}); there is nothing to segment")


def check_readable(path: Path, what: str = "") -> None:
    """Raise :class:`InputError` naming the problem unless ``path`` is a regular file this process can open: no such
    file, a dangling link or a link loop, permission denied, a folder, a FIFO or a device (reading a FIFO would
    block forever)."""
    label = f"{what} {path}".strip()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        dangling = os.path.lexists(path)
        raise InputError(f"{label}: " + ("a symbolic link to a missing file" if dangling else "no such file")) from None
    except PermissionError:
        raise InputError(f"{label}: permission denied (a folder on the way cannot be entered)") from None
    except OSError as error:
        reason = "a symbolic link loop" if error.errno == errno.ELOOP else (error.strerror or str(error))
        raise InputError(f"{label}: {reason}") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise InputError(f"{label} is {kind}, not a file")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise InputError(f"{label}: permission denied") from None
    except OSError as error:
        raise InputError(f"{label}: {error.strerror or error}") from None


def verify_gzip(path: Path) -> None:
    """Read a gzip stream to its end so that its CRC and length are checked: readers stop at the last voxel and
    never see a damaged trailer, which is how a file altered after compression goes unnoticed."""
    with open(path, "rb") as handle:
        if handle.read(2) != b"\x1f\x8b":
            raise InputError(f"cannot read {path.name}: not gzip-compressed, though its name says so")
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"cannot read {path.name}: the file is damaged, its gzip stream fails its integrity check "
                         f"({error})") from None


def load_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D scalar image; a trailing 4th dimension of length 1 is dropped. The file (and a detached data file
    or image pair) must be a regular, readable file, and a gzip-compressed one must pass its integrity check."""
    path = Path(path)
    check_readable(path)
    name = path.name.lower()
    for companion in _companions(path):
        check_readable(companion, f"{path.name}'s data file")
    try:
        if name.endswith(_NRRD_SUFFIXES):
            volume = _load_nrrd(path)
        else:
            if name.endswith((".gz", ".mgz")):
                verify_gzip(path)
            volume = _load_nibabel(path)
    except InputError:
        raise
    except PermissionError as error:
        raise InputError(f"cannot read {path.name}: permission denied ({error.filename})") from error
    except Exception as error:  # nibabel/pynrrd raise many types for unreadable files
        raise InputError(f"cannot read {path.name}: {error}") from error
    array = volume.array
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Volume(array, volume.affine)


def _companions(path: Path) -> list[Path]:
    """The other files a reader will open: an Analyze/NIfTI pair's other half, a detached NRRD's data file."""
    name = path.name.lower()
    if name.endswith((".hdr", ".img")):
        return [path.with_suffix(".img" if name.endswith(".hdr") else ".hdr")]
    if name.endswith(".nhdr"):
        import nrrd

        try:
            header = nrrd.read_header(str(path))
        except Exception as error:  # noqa: BLE001 - pynrrd raises many types
            raise InputError(f"cannot read {path.name}: {error}") from error
        data = header.get("data file", header.get("datafile"))
        if data is None:
            return []
        if str(data).split()[0].upper() == "LIST" or "%" in str(data):
            raise InputError(f"{path.name}: NRRD headers naming several data files are not supported")
        data = Path(data)
        return [data if data.is_absolute() else path.parent / data]
    return []


def _load_nibabel(path: Path) -> Volume:
    import nibabel as nib

    image = nib.load(str(path))
    _check_size(path, image.shape)
    # np.asanyarray(dataobj) applies scl_slope/scl_inter, as niimath does.
    return Volume(np.asanyarray(image.dataobj), image.affine)


def _check_size(path: Path, shape) -> None:
    if int(np.prod([int(n) for n in shape], dtype=np.float64)) > MAX_VOXELS:
        raise InputError(f"{path.name} claims {' x '.join(str(int(n)) for n in shape)} voxels, more than any MRI "
                         "scan; the file is damaged or not a scan")


def _load_nrrd(path: Path) -> Volume:
    import nrrd

    _check_size(path, nrrd.read_header(str(path)).get("sizes", ()))
    data, header = nrrd.read(str(path))
    space = str(header.get("space", "right-anterior-superior")).lower()
    if space not in _NRRD_SPACE_TO_RAS:
        raise InputError(f"{path.name}: unsupported NRRD space '{space}'")
    directions = np.asarray(header.get("space directions"), dtype=np.float64)
    if directions.ndim != 2 or directions.shape[1] != 3:
        raise InputError(f"{path.name}: needs 'space directions' for a 3D volume")
    # Rows of 'space directions' are per axis; NaN rows mark non-spatial axes (e.g. components).
    spatial = ~np.isnan(directions).any(axis=1)
    if spatial.sum() != 3:
        raise InputError(f"{path.name} is not a 3D scalar volume (space directions {directions.tolist()})")
    if not spatial.all():
        axes = [axis for axis, keep in enumerate(spatial) if not keep]
        if any(data.shape[axis] != 1 for axis in axes):
            raise InputError(f"{path.name} is not a scalar volume (shape {data.shape})")
        data = data.squeeze(axis=tuple(axes))
        directions = directions[spatial]
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    flip = np.diag([*_NRRD_SPACE_TO_RAS[space], 1.0])
    affine = np.eye(4)
    affine[:3, :3] = directions.T
    affine[:3, 3] = origin
    return Volume(data, flip @ affine)


def save_volume(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, *, label: bool = False) -> Path:
    """Write ``array`` ((i, j, k) order) with ``affine`` to NIfTI or NRRD, atomically.

    The file appears complete or not at all: it is written beside its destination as a partial
    file and renamed (see :mod:`.outputs`); a failure leaves an existing file at ``path`` as it was.
    """
    from .outputs import atomic_file

    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"output folder does not exist: {path.parent}")
    name = path.name.lower()
    if not name.endswith(_NRRD_SUFFIXES + (".nii", ".nii.gz")):
        raise InputError(f"unsupported output format: {path.name} (use .nii, .nii.gz or .nrrd)")
    with atomic_file(path) as partial:
        if name.endswith(_NRRD_SUFFIXES):
            _save_nrrd(str(partial), array, affine)
        else:
            _save_nifti(str(partial), array, affine, label)
    return path


def _save_nifti(tmp: str, array: np.ndarray, affine: np.ndarray, label: bool) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")                  # the affine is in mm (BIDS validators check it)
    if label:
        image.header.set_intent(NIFTI_INTENT_LABEL)
    nib.save(image, tmp)


def _save_nrrd(tmp: str, array: np.ndarray, affine: np.ndarray) -> None:
    import nrrd

    header = {
        "space": "right-anterior-superior",
        "space directions": np.asarray(affine, dtype=np.float64)[:3, :3].T,
        "space origin": np.asarray(affine, dtype=np.float64)[:3, 3],
        "encoding": "gzip",
    }
    nrrd.write(tmp, np.asarray(array), header)
