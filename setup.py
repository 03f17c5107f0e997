"""The optional C extension only (all metadata is in pyproject.toml): crop-window JPEG decoding for the `pil`
loader against the system libjpeg-turbo (libjpeg62-turbo-dev, which scripts/install.sh installs for
Pillow-SIMD). Optional: if it does not build, the loader decodes whole images through simplejpeg
(aimv2data/loader/decode_turbo.py). Here, not in pyproject.toml: setuptools still calls
`[tool.setuptools.ext-modules]` experimental and warns on every install."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("aimv2data.loader._jpegcrop", ["aimv2data/loader/_jpegcrop.c"], libraries=["jpeg"],
                             optional=True)])
