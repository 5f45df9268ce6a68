"""Drives Microsoft's Azure IoT Python SDKs for the compat tests. Runs in the compat virtualenv, not in opendps'.

Usage: ``python azure_sdk_driver.py <command> '<json arguments>'``; writes JSON lines on stdout, the last one
the result. Commands:

* ``provision`` — ProvisioningDeviceClient.register() (symmetric key or X.509).
* ``device`` — IoTHubDeviceClient: telemetry, twin get + reported patch, then prints ``ready`` and waits for the
  desired patches, direct methods and C2D messages named in ``expect`` (the test sends them from the service side).
  ``sastoken_ttl`` is passed to the client (its SAS renewal reconnects 120 s before the token expires); each change of
  the client's connection state is printed as ``connection`` with ``connected``.
* ``registry`` — IoTHubRegistryManager: a list of ``[method name, kwargs]`` calls, each result as a dict
  (``send_c2d_message`` over AMQP on 5671, trusting ``ca_file`` as its root).
"""

from __future__ import annotations

import json
import queue
import sys
import time
import warnings

warnings.simplefilter("ignore")  # ssl.PROTOCOL_TLSv1_2 deprecation inside the SDK


def emit(**fields) -> None:
    print(json.dumps(fields, default=str), flush=True)


def describe(exc: BaseException) -> dict:
    out = {"ok": False, "error_type": f"{type(exc).__module__}.{type(exc).__name__}", "error": str(exc)}
    cause = exc.__cause__
    if cause is not None:
        out["cause_type"] = f"{type(cause).__module__}.{type(cause).__name__}"
        out["cause"] = str(cause)
    response = getattr(exc, "response", None)
    if response is not None and hasattr(response, "status_code"):
        out["status_code"] = response.status_code
        out["body"] = response.text
    return out


def x509_of(args: dict):
    from azure.iot.device import X509

    return X509(cert_file=args["cert"], key_file=args["keyfile"])


def provision(args: dict) -> dict:
    from azure.iot.device import ProvisioningDeviceClient

    common = {"provisioning_host": args.get("host", "localhost"), "registration_id": args["rid"],
              "id_scope": args["scope"], "server_verification_cert": args["ca"], "websockets": args.get("websockets", False)}
    if "key" in args:
        client = ProvisioningDeviceClient.create_from_symmetric_key(symmetric_key=args["key"], **common)
    else:
        client = ProvisioningDeviceClient.create_from_x509_certificate(x509=x509_of(args), **common)
    if args.get("payload") is not None:
        client.provisioning_payload = args["payload"]
    try:
        result = client.register()  # connects, registers, polls and disconnects
    except Exception as exc:  # noqa: BLE001 - the SDK's exception is the result under test
        return describe(exc)
    state = result.registration_state
    return {"ok": True, "operation_id": result.operation_id, "status": result.status,
            "assigned_hub": state.assigned_hub, "device_id": state.device_id, "sub_status": state.sub_status,
            "etag": state.etag, "created": state.created_date_time, "response_payload": state.response_payload}


def device(args: dict) -> dict:
    from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse

    common = {"hostname": args["hostname"], "device_id": args["device_id"], "server_verification_cert": args["ca"],
              "websockets": args.get("websockets", False)}
    if "key" in args:
        if "sastoken_ttl" in args:
            common["sastoken_ttl"] = args["sastoken_ttl"]
        client = IoTHubDeviceClient.create_from_symmetric_key(symmetric_key=args["key"], **common)
    else:
        client = IoTHubDeviceClient.create_from_x509_certificate(x509=x509_of(args), **common)
    received: queue.Queue = queue.Queue()

    def on_connection() -> None:
        received.put(("connection", {"connected": client.connected, "at": time.time()}))

    def on_desired(patch: dict) -> None:
        received.put(("desired", {"patch": patch}))

    def on_method(request) -> None:
        client.send_method_response(MethodResponse.create_from_method_request(
            request, 200, {"method": request.name, "got": request.payload}))
        received.put(("method", {"name": request.name, "payload": request.payload, "request_id": request.request_id}))

    def on_message(message) -> None:
        data = message.data.decode() if isinstance(message.data, bytes) else message.data
        received.put(("c2d", {"data": data, "message_id": message.message_id, "correlation_id": message.correlation_id,
                              "content_type": message.content_type, "content_encoding": message.content_encoding,
                              "custom_properties": message.custom_properties, "ack": message.ack}))

    client.on_twin_desired_properties_patch_received = on_desired
    client.on_method_request_received = on_method
    client.on_message_received = on_message
    client.on_connection_state_change = on_connection
    try:
        client.connect()
        emit(event="connected")
        if "message" in args:
            spec = args["message"]
            msg = Message(spec["data"], message_id=spec.get("message_id"), content_encoding=spec.get("content_encoding"),
                          content_type=spec.get("content_type"))
            msg.custom_properties.update(spec.get("properties", {}))
            if spec.get("correlation_id"):
                msg.correlation_id = spec["correlation_id"]
            client.send_message(msg)
            emit(event="sent")
        twin = client.get_twin()
        emit(event="twin", twin=twin)
        if "reported" in args:
            client.patch_twin_reported_properties(args["reported"])
            emit(event="reported", twin=client.get_twin())
        emit(event="ready")
        wanted = list(args.get("expect", []))
        deadline = time.time() + args.get("timeout", 60)
        while wanted and time.time() < deadline:
            try:
                kind, fields = received.get(timeout=max(0.05, deadline - time.time()))
            except queue.Empty:
                break
            emit(event=kind, **fields)
            if kind in wanted:
                wanted.remove(kind)
        return {"ok": not wanted, "missing": wanted}
    except Exception as exc:  # noqa: BLE001
        return describe(exc)
    finally:
        client.shutdown()


def registry(args: dict) -> dict:
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties

    if args.get("ca_file"):
        # The "trusted root" change: send_c2d_message goes over AMQP (uamqp), which trusts certifi.where() when no
        # `verify` is given and offers no other hook; point it at the opendps server CA (REST trusts it through
        # REQUESTS_CA_BUNDLE, set by the test). Patched before the manager creates its AMQP client.
        import certifi

        certifi.where = lambda: args["ca_file"]
    manager = IoTHubRegistryManager.from_connection_string(args["connection_string"])
    results = []
    for name, kwargs in args["calls"]:
        if "twin" in kwargs:
            spec = kwargs.pop("twin")
            kwargs["device_twin"] = Twin(tags=spec.get("tags"), properties=TwinProperties(desired=spec.get("desired")))
        if "method" in kwargs:
            spec = kwargs.pop("method")
            kwargs["direct_method_request"] = CloudToDeviceMethod(
                method_name=spec["name"], payload=spec.get("payload"),
                response_timeout_in_seconds=spec.get("timeout", 30), connect_timeout_in_seconds=spec.get("connect_timeout"))
        try:
            value = getattr(manager, name)(**kwargs)
        except Exception as exc:  # noqa: BLE001
            results.append(describe(exc))
            continue
        results.append({"ok": True, "value": value.as_dict() if hasattr(value, "as_dict") else value})
    return {"ok": all(r["ok"] for r in results), "results": results}


if __name__ == "__main__":
    command, arguments = sys.argv[1], json.loads(sys.argv[2])
    result = {"provision": provision, "device": device, "registry": registry}[command](arguments)
    emit(event="result", **result)
