// Drives Microsoft's Azure IoT Node.js device SDKs for tests/compat/test_azure_node.py (the Node twin of
// ../azure_sdk_driver.py). Unmodified SDK calls: the host name is an argument and the server's root is trusted
// through NODE_EXTRA_CA_CERTS (set by the test), the two changes a real device makes.
//
// Usage: node driver.js <command> '<json arguments>'; writes JSON lines on stdout, the last one the result.
//   provision  ProvisioningDeviceClient.register() over "http", "mqtt" or "mqtt-ws", symmetric key (`key`) or X.509
//              (`cert`, `keyfile`: PEM files, the chain in `cert`), with an optional `payload`.
//   device     Client over MQTT (`websockets`: MQTT over WebSockets): telemetry (`message`), twin get + reported patch,
//              then `ready`, then waits for the desired patches, direct methods (handlers for the names in `methods`)
//              and C2D messages named in `expect`. `model_id`: a Plug and Play device; `renew`: renew the SAS after
//              the first desired event, as the SDK does 45 minutes into a connection.
'use strict';

const fs = require('fs');

function emit(fields) {
  process.stdout.write(JSON.stringify(fields) + '\n');
}

function describe(err) {
  const out = { ok: false, error_type: err && err.constructor ? err.constructor.name : typeof err, error: String(err && err.message || err) };
  const response = err && (err.response || (err.transportError && err.transportError.response));
  if (response && response.statusCode) out.status_code = response.statusCode;
  if (err && err.responseBody) out.body = String(err.responseBody);
  if (err && err.result) out.result = err.result;
  if (err && err.transportError) out.transport_error = String(err.transportError.message || err.transportError);
  return out;
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms); });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function provision(args) {
  const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
  const Transport = args.transport === 'http' ? require('azure-iot-provisioning-device-http').Http
    : args.transport === 'mqtt-ws' ? require('azure-iot-provisioning-device-mqtt').MqttWs
      : require('azure-iot-provisioning-device-mqtt').Mqtt;
  let security;
  if (args.key) {
    const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
    security = new SymmetricKeySecurityClient(args.rid, args.key);
  } else {
    const { X509Security } = require('azure-iot-security-x509');
    security = new X509Security(args.rid, { cert: fs.readFileSync(args.cert, 'utf8'), key: fs.readFileSync(args.keyfile, 'utf8') });
  }
  const client = ProvisioningDeviceClient.create(args.host || 'localhost', args.scope, new Transport(), security);
  if (args.payload !== undefined) client.setProvisioningPayload(args.payload);
  try {
    const state = await withTimeout(client.register(), 60000, 'register');
    return { ok: true, status: state.status, assigned_hub: state.assignedHub, device_id: state.deviceId,
             sub_status: state.substatus, etag: state.etag, created: state.createdDateTimeUtc,
             response_payload: state.payload === undefined ? null : state.payload };
  } catch (err) {
    return describe(err);
  }
}

async function device(args) {
  const { Client, Message } = require('azure-iot-device');
  const { Mqtt, MqttWs } = require('azure-iot-device-mqtt');
  const host = args.hostname || 'localhost';
  const cs = args.key ? `HostName=${host};DeviceId=${args.device_id};SharedAccessKey=${args.key}`
    : `HostName=${host};DeviceId=${args.device_id};x509=true`;
  const Transport = args.websockets ? MqttWs : Mqtt;
  let client;
  let auth = null;
  if (args.renew) {  // what Client.fromConnectionString builds, kept at hand to renew the SAS on demand
    const { SharedAccessKeyAuthenticationProvider } = require('azure-iot-device');
    auth = SharedAccessKeyAuthenticationProvider.fromConnectionString(cs);
    client = Client.fromAuthenticationProvider(auth, Transport);
  } else {
    client = Client.fromConnectionString(cs, Transport);
  }
  if (args.model_id) await client.setOptions({ modelId: args.model_id });
  if (!args.key) await client.setOptions({ cert: fs.readFileSync(args.cert, 'utf8'), key: fs.readFileSync(args.keyfile, 'utf8') });
  const wanted = [...(args.expect || [])];
  const backlog = [];
  let wake = () => {};
  const received = (kind, fields) => {
    backlog.push([kind, fields]);
    wake();
  };
  client.on('error', (err) => emit({ event: 'error', ...describe(err) }));
  client.on('message', (msg) => {
    const custom = {};
    for (const { key, value } of msg.properties.propertyList) custom[key] = value;
    received('c2d', { data: msg.data.toString(), message_id: msg.messageId, correlation_id: msg.correlationId,
                      content_type: msg.contentType, content_encoding: msg.contentEncoding, ack: msg.ack,
                      custom_properties: custom });
    client.complete(msg, () => {});
  });
  for (const name of args.methods || []) {
    client.onDeviceMethod(name, (request, response) => {
      response.send(200, { method: request.methodName, got: request.payload }, () => {});
      received('method', { name: request.methodName, payload: request.payload, request_id: request.requestId });
    });
  }
  try {
    await withTimeout(client.open(), 30000, 'open');
    emit({ event: 'connected' });
    if (args.message) {
      const spec = args.message;
      const msg = new Message(spec.data);
      if (spec.message_id) msg.messageId = spec.message_id;
      if (spec.correlation_id) msg.correlationId = spec.correlation_id;
      if (spec.content_type) msg.contentType = spec.content_type;
      if (spec.content_encoding) msg.contentEncoding = spec.content_encoding;
      for (const [k, v] of Object.entries(spec.properties || {})) msg.properties.add(k, v);
      await withTimeout(client.sendEvent(msg), 30000, 'sendEvent');
      emit({ event: 'sent' });
    }
    const twin = await withTimeout(client.getTwin(), 30000, 'getTwin');
    emit({ event: 'twin', twin: { desired: twin.properties.desired, reported: twin.properties.reported } });
    if (args.reported) {
      await withTimeout(new Promise((resolve, reject) => twin.properties.reported.update(args.reported,
        (err) => (err ? reject(err) : resolve()))), 30000, 'reported update');
      const again = await withTimeout(client.getTwin(), 30000, 'getTwin');
      emit({ event: 'reported', twin: { desired: again.properties.desired, reported: again.properties.reported } });
    }
    twin.on('properties.desired', (patch) => received('desired', { patch }));
    emit({ event: 'ready' });
    const deadline = Date.now() + (args.timeout || 60) * 1000;
    while (wanted.length && Date.now() < deadline) {
      if (!backlog.length) {
        await new Promise((resolve) => { wake = resolve; setTimeout(resolve, Math.max(50, deadline - Date.now())); });
        continue;
      }
      const [kind, fields] = backlog.shift();
      emit({ event: kind, ...fields });
      const at = wanted.indexOf(kind);
      if (at >= 0) wanted.splice(at, 1);
      if (auth && kind === 'desired') {
        // The SAS renewal the SDK makes 45 minutes into a connection (1 h tokens), brought forward: the new token
        // is signed at once and the transport reconnects with it (DISCONNECT, CONNECT with clean session 0) without
        // subscribing again. A message sent meanwhile waits for the new connection: its PUBACK says it is up.
        auth.setTokenRenewalValues(3600, 900);
        auth = null;
        await withTimeout(client.sendEvent(new Message('after renewal')), 30000, 'sendEvent after renewal');
        emit({ event: 'renewed' });
      }
    }
    return { ok: !wanted.length, missing: wanted };
  } catch (err) {
    return describe(err);
  } finally {
    await client.close().catch(() => {});
  }
}

async function main() {
  const [command, raw] = process.argv.slice(2);
  const commands = { provision, device };
  if (!commands[command]) throw new Error(`unknown command ${command}`);
  const result = await commands[command](JSON.parse(raw));
  emit({ event: 'result', ...result });
  process.exit(0);  // the SDKs keep timers (retry, keep-alive) alive after close
}

main().catch((err) => {
  emit({ event: 'result', ...describe(err) });
  process.exit(1);
});
