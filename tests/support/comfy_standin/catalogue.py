"""The stand-in's node catalogue and ``POST /prompt`` validation.

The catalogue is ``data/object_info.json``: entries copied verbatim from the recorded
``object_info.json`` (ComfyUI v0.8.0). Combo options of model loaders and of ``LoadImage`` are
replaced at request time by the stand-in's configured models and its input folder, keeping the
recorded shape (old ``[[...], {...}]`` or new ``["COMBO", {"options": [...]}]``).

Validation reproduces the error bodies recorded in ``recordings/errors.json``: the error types,
messages, ``details`` strings, ``extra_info`` and ``dependent_outputs`` are built the way the
recorded ones are.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MODEL_INPUTS", "Catalogue", "PromptRejected", "ValidationResult"]

_DATA = Path(__file__).parent / "data" / "object_info.json"

#: Loader inputs whose options are model files, by folder (``/models/{folder}``).
MODEL_INPUTS: Mapping[tuple[str, str], str] = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("UpscaleModelLoader", "model_name"): "upscale_models",
    ("LoraLoader", "lora_name"): "loras",
    ("VAELoader", "vae_name"): "vae",
}
# Nodes with a VALIDATE_INPUTS for their ``image`` input: ComfyUI skips the combo check and
# runs the node's own ("custom_validation_failed", errors.json: missing_input_image).
_IMAGE_LOADERS = ("LoadImage", "LoadImageMask")


# errors.json link_to_missing_node: the traceback ComfyUI returned, verbatim.
_MISSING_NODE_TRACEBACK = [
    '  File "ComfyUI/execution.py", line 1043, in validate_prompt\n'
    "    m = await validate_inputs(prompt_id, prompt, o, validated)\n"
    "        ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
    '  File "ComfyUI/execution.py", line 818, in validate_inputs\n'
    "    o_class_type = prompt[o_id]['class_type']\n"
    "                   ~~~~~~^^^^^^\n",
]


class PromptRejected(Exception):
    """``POST /prompt`` answers 400 with ``body`` (errors.json shapes)."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["type"])
        self.body = body


@dataclass(frozen=True, slots=True)
class ValidationResult:
    outputs: list[str]
    """Output nodes that passed (they will run)."""
    node_errors: dict[str, Any]
    """Errors of nodes feeding outputs that failed (a 200 may still carry some)."""


def _error(kind: str, message: str, details: str, extra: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


class Catalogue:
    """Node definitions, with live combo options for models and input files."""

    def __init__(
        self,
        models: Mapping[str, list[str]],
        input_files: Callable[[], list[str]],
        extra_nodes: Mapping[str, Any] | None = None,
    ) -> None:
        self._base: dict[str, Any] = json.loads(_DATA.read_text(encoding="utf-8"))
        self._base.update(copy.deepcopy(dict(extra_nodes or {})))
        self.models = {folder: list(names) for folder, names in models.items()}
        self._input_files = input_files

    def remove_node(self, class_type: str) -> None:
        """Make a node type unknown to this agent (a missing custom node)."""
        self._base.pop(class_type, None)

    def has(self, class_type: str) -> bool:
        return class_type in self._base

    def info(self, class_type: str) -> dict[str, Any]:
        entry: dict[str, Any] = copy.deepcopy(self._base[class_type])
        required = entry.get("input", {}).get("required", {})
        if class_type in _IMAGE_LOADERS and "image" in required:
            required["image"][0] = self._input_files()
        for (owner, name), folder in MODEL_INPUTS.items():
            if owner == class_type and name in required:
                options = sorted(self.models.get(folder, []))
                spec = required[name]
                if spec and spec[0] == "COMBO":
                    spec[1]["options"] = options
                else:
                    spec[0] = options
        return entry

    def all_info(self) -> dict[str, Any]:
        return {name: self.info(name) for name in self._base}

    def is_output(self, class_type: str) -> bool:
        return bool(self._base[class_type].get("output_node"))

    def return_types(self, class_type: str) -> list[Any]:
        return list(self._base[class_type].get("output", []))

    # ---- validation (execution.validate_prompt / validate_inputs) ------------------------

    def validate(self, prompt: dict[str, Any]) -> ValidationResult:
        """Raise :class:`PromptRejected` as ComfyUI would, else the outputs to run."""
        outputs = []
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or "class_type" not in node:
                raise PromptRejected(
                    {
                        "error": _error(
                            "invalid_prompt",
                            "Cannot execute because a node is missing the class_type property.",
                            f"Node ID '#{node_id}'",
                            {},
                        ),
                        "node_errors": {},
                    }
                )
            class_type = node["class_type"]
            if not self.has(class_type):
                raise PromptRejected(
                    {
                        "error": _error(
                            "invalid_prompt",
                            f"Cannot execute because node {class_type} does not exist.",
                            f"Node ID '#{node_id}'",
                            {},
                        ),
                        "node_errors": {},
                    }
                )
            if self.is_output(class_type):
                outputs.append(node_id)
        if not outputs:
            raise PromptRejected(
                {
                    "error": _error("prompt_no_outputs", "Prompt has no outputs", "", {}),
                    "node_errors": {},
                }
            )
        good: list[str] = []
        failed: list[tuple[str, list[dict[str, Any]]]] = []
        node_errors: dict[str, Any] = {}
        validated: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        for output in outputs:
            try:
                valid, reasons = self._validate_inputs(prompt, output, validated)
            except KeyError as exc:
                # errors.json link_to_missing_node: a link to an absent node id.
                valid = False
                reasons = [
                    _error(
                        "exception_during_validation",
                        "Exception when validating node",
                        str(exc),
                        {
                            "exception_type": "KeyError",
                            "traceback": _MISSING_NODE_TRACEBACK,
                        },
                    )
                ]
                validated[output] = (False, reasons)
            if valid:
                good.append(output)
                continue
            failed.append((output, reasons))
            for node_id, (ok, node_reasons) in validated.items():
                if ok or not node_reasons:
                    continue
                entry = node_errors.setdefault(
                    node_id,
                    {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    },
                )
                entry["dependent_outputs"].append(output)
        if not good:
            details = "\n".join(f"{r['message']}: {r['details']}" for _, rs in failed for r in rs)
            raise PromptRejected(
                {
                    "error": _error(
                        "prompt_outputs_failed_validation",
                        "Prompt outputs failed validation",
                        details,
                        {},
                    ),
                    "node_errors": node_errors,
                }
            )
        return ValidationResult(good, node_errors)

    def _validate_inputs(
        self,
        prompt: dict[str, Any],
        node_id: str,
        validated: dict[str, tuple[bool, list[dict[str, Any]]]],
    ) -> tuple[bool, list[dict[str, Any]]]:
        if node_id in validated:
            return validated[node_id]
        node = prompt[node_id]
        class_type = node["class_type"]
        inputs = node.get("inputs", {})
        info = self.info(class_type)
        spec = info.get("input", {})
        errors: list[dict[str, Any]] = []
        valid = True
        for category in ("required", "optional"):
            for name, raw_config in spec.get(category, {}).items():
                input_type = raw_config[0]
                extra = raw_config[1] if len(raw_config) > 1 else {}
                config = [input_type, extra]  # get_input_info fills in a missing {}
                if name not in inputs:
                    if category == "required":
                        errors.append(
                            _error(
                                "required_input_missing",
                                "Required input is missing",
                                name,
                                {"input_name": name},
                            )
                        )
                    continue
                value = inputs[name]
                if isinstance(value, list):
                    if len(value) != 2:
                        errors.append(
                            _error(
                                "bad_linked_input",
                                "Bad linked input, must be a length-2 list of [node_id, slot_index]",  # noqa: E501
                                name,
                                {
                                    "input_name": name,
                                    "input_config": config,
                                    "received_value": value,
                                },
                            )
                        )
                        continue
                    source_id, slot = value
                    source_class = prompt[source_id]["class_type"]  # KeyError: see validate()
                    received = self.return_types(source_class)[slot]
                    if not _types_match(received, input_type):
                        errors.append(
                            _error(
                                "return_type_mismatch",
                                "Return type mismatch between linked nodes",
                                f"{name}, received_type({received}) mismatch input_type({input_type})",  # noqa: E501
                                {
                                    "input_name": name,
                                    "input_config": config,
                                    "received_type": received,
                                    "linked_node": value,
                                },
                            )
                        )
                        continue
                    ok, _ = self._validate_inputs(prompt, source_id, validated)
                    if not ok:
                        valid = False
                    continue
                error = self._check_value(class_type, name, input_type, extra, config, value)
                if error is not None:
                    errors.append(error)
        if class_type in _IMAGE_LOADERS and isinstance(inputs.get("image"), str):
            image = inputs["image"]
            if image not in self._input_files():
                errors.append(
                    _error(
                        "custom_validation_failed",
                        "Custom validation failed for node",
                        f"image - Invalid image file: {image}",
                        {"input_name": "image"},
                    )
                )
        result = (valid and not errors, errors)
        validated[node_id] = result
        return result

    def _check_value(
        self,
        class_type: str,
        name: str,
        input_type: Any,
        extra: dict[str, Any],
        config: list[Any],
        value: Any,
    ) -> dict[str, Any] | None:
        converters: dict[str, Callable[[Any], Any]] = {
            "INT": int,
            "FLOAT": float,
            "STRING": str,
            "BOOLEAN": bool,
        }
        if isinstance(input_type, str) and input_type in converters:
            try:
                value = converters[input_type](value)
            except (TypeError, ValueError) as exc:
                return _error(
                    "invalid_input_type",
                    f"Failed to convert an input value to a {input_type} value",
                    f"{name}, {value}, {exc}",
                    {
                        "input_name": name,
                        "input_config": config,
                        "received_value": value,
                        "exception_message": str(exc),
                    },
                )
            if "min" in extra and value < extra["min"]:
                return _error(
                    "value_smaller_than_min",
                    f"Value {value} smaller than min of {extra['min']}",
                    name,
                    {"input_name": name, "input_config": config, "received_value": value},
                )
            if "max" in extra and value > extra["max"]:
                return _error(
                    "value_bigger_than_max",
                    f"Value {value} bigger than max of {extra['max']}",
                    name,
                    {"input_name": name, "input_config": config, "received_value": value},
                )
            return None
        if class_type in _IMAGE_LOADERS and name == "image":
            return None  # custom validation instead (see above)
        options: list[Any] | None = None
        if isinstance(input_type, list):
            options = input_type
        elif input_type == "COMBO":
            options = list(extra.get("options", []))
        if options is not None and value not in options:
            # ComfyUI drops long option lists from the message (execution.validate_inputs).
            listing = str(options)
            shown: list[Any] | None = config
            if len(options) > 20:
                listing, shown = f"(list of length {len(options)})", None
            return _error(
                "value_not_in_list",
                "Value not in list",
                f"{name}: '{value}' not in {listing}",
                {"input_name": name, "input_config": shown, "received_value": value},
            )
        return None


def _types_match(received: Any, wanted: Any) -> bool:
    if isinstance(wanted, list):  # an old-shape combo fed by a link
        return True
    if received == wanted or "*" in (received, wanted):
        return True
    if isinstance(received, str) and isinstance(wanted, str):
        return set(received.split(",")) <= set(wanted.split(","))
    return False
