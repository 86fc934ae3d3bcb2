"""Webhooks: signed ReplyTo deliveries of finished jobs."""

from aiserver.webhooks.guard import RefusedTarget, TargetGuard, is_public, validate_reply_to
from aiserver.webhooks.payload import body_of, message_id, payload_of
from aiserver.webhooks.sender import (
    DeliveryOutcome,
    DeliveryStatus,
    WebhookSender,
    webhook_record,
)
from aiserver.webhooks.signing import SignatureError, sign, signature_headers, verify

__all__ = [
    "DeliveryOutcome",
    "DeliveryStatus",
    "RefusedTarget",
    "SignatureError",
    "TargetGuard",
    "WebhookSender",
    "body_of",
    "is_public",
    "message_id",
    "payload_of",
    "sign",
    "signature_headers",
    "validate_reply_to",
    "verify",
    "webhook_record",
]
