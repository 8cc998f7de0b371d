"""Write a small DICOM whole-slide image series (VL Whole Slide Microscopy Image) with pydicom.

One file per pyramid level (TILED_FULL, uncompressed RGB, explicit VR little endian, the
transfer syntax OpenSlide 4 decodes without a codec) plus an optional label image, all of one
series in one folder: the layout scanners and ``wsidicomizer`` write. Pixels are exact, so a
reader can be checked pixel for pixel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _instance(
    path: Path,
    rgb: np.ndarray,
    *,
    tile: tuple[int, int],
    mpp: float,
    image_type: list[str],
    series: str,
    study: str,
    frame_of_reference: str,
) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    h, w, _ = rgb.shape
    th, tw = tile
    rows, cols = -(-h // th), -(-w // tw)
    padded = np.zeros((rows * th, cols * tw, 3), np.uint8)
    padded[:h, :w] = rgb
    # TILED_FULL: frames in row-major tile order
    frames = padded.reshape(rows, th, cols, tw, 3).transpose(0, 2, 1, 3, 4)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSI_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = WSI_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = frame_of_reference
    ds.Modality = "SM"
    ds.ImageType = image_type
    ds.Rows, ds.Columns = th, tw
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = h, w
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfFrames = rows * cols
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]  # mm: row spacing, column spacing
    measures.SliceThickness = 0.001
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    optical = Dataset()
    optical.OpticalPathIdentifier = "1"
    optical.ObjectiveLensPower = 20
    ds.OpticalPathSequence = Sequence([optical])
    ds.NumberOfOpticalPaths = 1
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_dicom_wsi(
    folder: Path,
    rgb: np.ndarray,
    *,
    mpp: float,
    levels: int = 2,
    tile: int = 256,
    label: bool = True,
    names: tuple[str, ...] | None = None,
) -> list[Path]:
    """Write ``rgb`` (H, W, 3 uint8, level 0 at ``mpp`` µm/px) as a DICOM WSI series.

    Level ``i`` is ``rgb`` averaged over 2^i × 2^i blocks (H and W must divide by
    2^(levels-1)). Returns the files written: levels finest first, then the label.
    ``names`` overrides the file names (DICOM files are often named by UID, no extension).
    """
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    count = levels + int(label)
    names = names or tuple(
        [f"level{i}.dcm" for i in range(levels)] + (["label.dcm"] if label else [])
    )
    assert len(names) == count
    paths = []
    img = rgb
    for i in range(levels):
        image_type = (
            ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
            if i == 0
            else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        )
        path = folder / names[i]
        _instance(
            path,
            img,
            tile=(tile, tile),
            mpp=mpp * 2**i,
            image_type=image_type,
            series=series,
            study=study,
            frame_of_reference=frame,
        )
        paths.append(path)
        h, w, _ = img.shape
        img = img.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    if label:
        text = np.full((64, 160, 3), 255, np.uint8)
        text[20:44, 20:140] = (0, 0, 0)
        path = folder / names[levels]
        _instance(
            path,
            text,
            tile=text.shape[:2],  # one frame: associated images are read whole
            mpp=50.0,
            image_type=["ORIGINAL", "PRIMARY", "LABEL", "NONE"],
            series=series,
            study=study,
            frame_of_reference=frame,
        )
        paths.append(path)
    return paths
