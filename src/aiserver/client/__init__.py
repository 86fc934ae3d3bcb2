"""A typed Python client of the imagetasks.v1 service: asyncio (:class:`AsyncClient`) and
blocking (:class:`Client`).

.. code-block:: python

    from aiserver.client import Client

    with Client("localhost:50051", api_key=None) as client:
        result = client.upscale("photo.png").run()          # waits, collects the bytes
        open("photo-2x.png", "wb").write(result.outputs[0].data)
        for event in client.image_to_image("photo.png", prompt="a lighthouse"):
            print(event)                                    # Accepted, Progress, ...
        client.convert("photo.png", format="webp", out="photo.webp")

Inputs are a path, ``bytes`` or a binary file object, uploaded in 1 MiB chunks (paths are
read chunk by chunk, never whole). Each call's parameters are a frozen dataclass of
:mod:`aiserver.client.requests` (``client.upscale(image, model=m)`` is
``client.start(ImageUpscale(image, model=m))``). A blocking call's deadline is its
``timeout``, else the client's, else 300 s; the asyncio client has no default deadline.
Generative calls (``image_to_image``, ``image_with_mask``, ``upscale``, ``image_to_text``)
return a job stream: iterate it for
:data:`Event` dataclasses, or call ``run()`` for a :class:`Result`. Light calls (``crop``,
``convert``, ``variant``) return the image (or write it to ``out`` as it arrives). Jobs:
``get_job``, ``list_jobs``, ``iter_jobs``, ``watch_job``, ``cancel_job``; artifacts:
``get_artifact``, ``read_artifact``, ``stream_artifact``, ``save_artifact``. Jobs and
artifacts are the contract's protobuf messages. Every failed call raises
:class:`ClientError`.
"""

from aiserver.client._async import DEFAULT_TARGET, AsyncClient, JobStream
from aiserver.client._sync import Client, SyncJobStream
from aiserver.client.errors import ClientError, FieldViolation
from aiserver.client.inputs import CHUNK_SIZE, Destination, Input
from aiserver.client.requests import (
    ConvertImage,
    CropImage,
    GetVariant,
    ImageToImage,
    ImageToText,
    ImageUpscale,
    ImageWithMask,
    ListJobs,
)
from aiserver.client.types import (
    Accepted,
    Event,
    Finished,
    ImageInfo,
    ImageResult,
    JobPage,
    Output,
    OutputData,
    OutputReady,
    Progress,
    Result,
    Retrying,
    Stage,
    TextOutput,
    VariantInfo,
    VariantResult,
)

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_TARGET",
    "Accepted",
    "AsyncClient",
    "Client",
    "ClientError",
    "ConvertImage",
    "CropImage",
    "Destination",
    "Event",
    "FieldViolation",
    "Finished",
    "GetVariant",
    "ImageInfo",
    "ImageResult",
    "ImageToImage",
    "ImageToText",
    "ImageUpscale",
    "ImageWithMask",
    "Input",
    "JobPage",
    "JobStream",
    "ListJobs",
    "Output",
    "OutputData",
    "OutputReady",
    "Progress",
    "Result",
    "Retrying",
    "Stage",
    "SyncJobStream",
    "TextOutput",
    "VariantInfo",
    "VariantResult",
]
