"""The annotation service on Ray Serve: one deployment whose replicas each hold the model,
an embedding cache and a dataset writer, behind a FastAPI app that serves the browser page
and the JSON protocol of `schemas.interactive`:

    GET  /                          the page (engine/static/index.html, app.js)
    GET  /api/images                the images to annotate, the stage and round
    POST /api/images/{i}/open       read image i, cache its embedding, pre-fill (semi_auto)
    GET  /api/images/{i}/image.png  image i as decoded (upright RGB) for the page
    POST /api/predict               a click: points / box / previous mask / text -> best mask
    POST /api/commit                the accepted masks of an image -> one dataset commit
    GET  /api/stats                 encoder runs, cache hits and bytes of this replica

Clicks carry their whole prompt (points, box, previous low-res logits), so replicas hold
no session state: a click that lands on a replica without the embedding is answered after
one encoder pass there. One replica is the common case for a handful of annotators; more
replicas scale encoders, each with its own cache.
"""
import io
import socket
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, Response
from ray import serve

from schemas.interactive import (
    CommitRequest, CommitResponse, EngineConfig, EngineStats, ImageEntry, ImageList, OpenResponse, PredictRequest,
    PredictResponse, PrefillMask,
)

STATIC = Path(__file__).resolve().parent / "static"
app = FastAPI(title="samengine annotation", docs_url=None, redoc_url=None)


@serve.deployment
@serve.ingress(app)
class AnnotationService:
    def __init__(self, config: dict[str, Any]):
        # Heavy imports here, in the replica: the driver that deploys the app needs none of them.
        import torch

        from model.checkpoint import local_checkpoint
        from amg import AmgParams
        from dataset import DatasetWriter
        from dataset.lineage import file_sha256, new_lineage
        from model import load_checkpoint

        from .images import ImageCatalog
        from .segmenter import Segmenter
        from .semi_auto import dataset_prefill

        self.config = cfg = EngineConfig(**config)
        device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cpu":
            torch.set_num_threads(cfg.torch_threads)
        checkpoint = local_checkpoint(cfg.checkpoint, cfg.endpoint_url)
        model, _ = load_checkpoint(checkpoint, model_type=cfg.model_type, device=device)
        generator = None
        if cfg.prefill == "generator":
            generator = AmgParams(**{**cfg.amg.model_dump(), "output_mode": "coco_rle",
                                     "pred_iou_thresh": cfg.prefill_min_iou})
        self.segmenter = Segmenter(model, precision=cfg.precision, cache_bytes=cfg.cache_bytes, generator=generator)
        self.catalog = ImageCatalog.of(cfg)
        # image_id -> pre-filled mask records of a dataset (the generator's are the segmenter's).
        self.prefills: dict[str, list[dict]] = {}
        if cfg.prefill == "dataset":
            self.prefills = dataset_prefill(cfg.prefill_from or cfg.images_from, min_iou=cfg.prefill_min_iou,
                                            run_id=cfg.prefill_run_id, endpoint_url=cfg.endpoint_url)
        params = {"service": cfg.model_dump(mode="json", include={"stage", "prefill", "prefill_from",
                                                                     "prefill_run_id", "prefill_min_iou"}),
                  "amg": generator.model_dump(mode="json") if generator else None}
        run_id = cfg.run_id or f"{cfg.stage}-r{cfg.round}-{time.strftime('%Y%m%dT%H%M%S')}"
        lineage = new_lineage(round=cfg.round, stage=cfg.stage, params=params, run_id=run_id,
                              checkpoint_hash=file_sha256(checkpoint))
        self.writer = DatasetWriter(cfg.output, lineage, endpoint_url=cfg.endpoint_url)
        self.writer.start_run()
        self._write_lock = threading.Lock()
        self.commits = 0

    # -- the page ----------------------------------------------------------------------------------
    @app.get("/")
    def page(self):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/app.js")
    def script(self):
        return FileResponse(STATIC / "app.js", media_type="text/javascript")

    # -- protocol ----------------------------------------------------------------------------------
    @app.get("/api/images", response_model=ImageList)
    def images(self) -> ImageList:
        entries = [ImageEntry(index=i, uri=u) for i, u in enumerate(self.catalog.uris)]
        return ImageList(stage=self.config.stage, round=self.config.round, output=self.config.output, images=entries,
                         text_prompts=self.segmenter.takes_text)

    @app.post("/api/images/{index}/open", response_model=OpenResponse)
    def open_image(self, index: int) -> OpenResponse:
        from .images import committed

        image = self._load(index)
        _, encoded, encode_ms = self.segmenter.embed(image.image_id, lambda: image)
        records = self.segmenter.generated.get(image.image_id) or self.prefills.get(image.image_id, [])
        prefill = [PrefillMask(**{k: r.get(k) for k in PrefillMask.model_fields}) for r in records]
        return OpenResponse(index=index, uri=image.uri, image_id=image.image_id, width=image.width,
                            height=image.height, encoded=encoded, encode_ms=encode_ms,
                            committed=committed(self.config.output, image.image_id, self.config.endpoint_url),
                            prefill=prefill)

    @app.get("/api/images/{index}/image.png")
    def image_png(self, index: int):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self._load(index).rgb).save(buf, format="PNG", compress_level=1)
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/api/predict", response_model=PredictResponse)
    def predict(self, request: PredictRequest) -> PredictResponse:
        # Checked even when the embedding is cached (the cache knows image_ids, not indexes):
        # a mask must be of the image the client has at `index`.
        image = self._load(request.index, request.image_id, check_only=True)
        try:
            out = self.segmenter.predict(request, lambda: image or self._load(request.index, request.image_id))
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return PredictResponse(**out)

    @app.post("/api/commit", response_model=CommitResponse)
    def commit(self, request: CommitRequest) -> CommitResponse:
        from .images import phash
        from .segmenter import annotation_record

        image = self._load(request.index, request.image_id)
        try:
            annotations = [annotation_record(m, image.height, image.width) for m in request.masks]
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        record = {"image_id": image.image_id, "uri": image.uri, "width": image.width, "height": image.height,
                  "phash": phash(image), "annotations": annotations}
        with self._write_lock:
            version = self.writer.commit_images([record])
        if version is None:
            raise HTTPException(409, f"{image.uri} is already in {self.config.output}: one commit per image")
        self.commits += 1
        return CommitResponse(image_id=image.image_id, version=version, masks=len(annotations),
                              stage=self.config.stage, round=self.config.round)

    @app.get("/api/stats", response_model=EngineStats)
    def stats(self) -> EngineStats:
        s, c = self.segmenter, self.segmenter.cache
        return EngineStats(encodes=s.encodes, predicts=s.predicts, cache_hits=c.hits, cache_misses=c.misses,
                           cache_items=len(c), cache_bytes=c.nbytes, cache_limit_bytes=c.max_bytes,
                           commits=self.commits)

    def _load(self, index: int, image_id: str | None = None, *, check_only: bool = False):
        """Image `index` (which must still be image_id when given), or the HTTP error of a
        bad index. check_only: None instead when this replica has read it as image_id."""
        try:
            if image_id is None:
                return self.catalog.load(index)
            if check_only:
                return self.catalog.check(index, image_id)
            return self.catalog.load_checked(index, image_id)
        except IndexError as e:
            raise HTTPException(404, str(e)) from None
        except KeyError as e:
            raise HTTPException(409, str(e.args[0])) from None
        except ValueError as e:  # unreadable or undecodable file
            raise HTTPException(422, f"image {index}: {e}") from None


# -- running it -------------------------------------------------------------------------------------
def build_app(config: EngineConfig | dict[str, Any]):
    """The Serve application of a config (replicas and their resources from the config)."""
    cfg = config if isinstance(config, EngineConfig) else EngineConfig(**config)
    options = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    return AnnotationService.options(num_replicas=cfg.num_replicas, ray_actor_options=options).bind(
        cfg.model_dump(mode="json"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(config: EngineConfig | dict[str, Any], *, port: int = 8000, name: str = "annotate") -> str:
    """Start Serve's HTTP proxy on 127.0.0.1:port (in the connected Ray cluster), deploy the
    service and return its base URL. Call serve.shutdown() to stop it."""
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=name, route_prefix="/")
    return f"http://127.0.0.1:{port}"
