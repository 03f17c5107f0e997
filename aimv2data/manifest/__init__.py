"""The native-resolution manifest: webdataset tars -> bucketed parquet index (manifests/SPEC.md).

    from aimv2data.manifest.build import build_manifest
    build_manifest(["shards/"], "manifest/", workers=4)

Modules: tarindex (member offsets, DALI .idx), inspect_image (header size, EXIF, cheap verify), schema (columns,
atomic writers), build (per-tar parts, --part i/N, merge), captions (attach / generate synthetic
captions), stats (summary and plots). The bucket table lives in aimv2data.buckets (the loader uses it too).
"""
