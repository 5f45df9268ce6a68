"""MQTT 3.1.1 for the device plane: a sans-IO codec (:mod:`.codec`) and an asyncio session server (:mod:`.server`).

Hand-written because no maintained library fits: amqtt refuses client publishes to ``$`` topics
since 0.11.2 (Azure devices publish to ``$dps/...`` and ``$iothub/...``) and needs private APIs to
answer a single session; mqttproto and mqtt5 speak MQTT 5 only, while every Azure SDK speaks 3.1.1.

Import the submodules directly: the device SDK may use :mod:`.codec` without pulling in server code.
"""
