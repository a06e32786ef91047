# CPU image: the whole product with the CPU mouth engine and espeak-ng TTS; no torch, no weights.
#
#   docker build -t lipsync .
#   docker run -p 8010:8010 -v lipsync-data:/data lipsync
#
# Settings: flags after the image name (they replace the command: start with python -m server),
# LIPSYNC_* variables (-e), or a TOML file mounted and named by LIPSYNC_CONFIG; see README
# "Configuration". Change the port with -e LIPSYNC_PORT so the health check follows it.
FROM python:3.11-slim

# The only system libraries: OpenCV (which mediapipe brings) loads libGL and GLib. espeak-ng,
# FFmpeg, libvpx and opus come inside the Python wheels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .
# As ./run.sh installs for serving (editable: the server serves web/ from the source tree).
RUN python -m pip install --upgrade pip \
    && python -m pip install -e .

# Avatars (the default one is built on first start), recordings and outputs live in /data.
RUN useradd --create-home --uid 10001 lipsync \
    && mkdir -p /data \
    && chown lipsync:lipsync /data
USER lipsync
ENV LIPSYNC_DATA_DIR=/data
VOLUME ["/data"]

EXPOSE 8010
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/digital_human/check' % os.environ.get('LIPSYNC_PORT', '8010'), timeout=4)"
CMD ["python", "-m", "server", "--host", "0.0.0.0"]
