"""Offline push end to end: worker -> offline-pushes -> its own consumer group -> providers."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from resonance_task.commands.traffic import group_chat
from resonance_task.embedded.providers import ProviderServer
from resonance_task.offline.tokens import DeviceToken, RedisDeviceTokenStore
from tests.harness import PipelineFactory, eventually
from tests.offline.fakes import pem


async def test_offline_members_reach_the_provider_server_with_their_tokens(
    pipeline_factory: PipelineFactory, redis_url: str, workdir: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    async with ProviderServer(webhook_secret="s3cret") as server:
        account = workdir / "service-account.json"
        account.write_text(
            json.dumps(
                {
                    "client_email": "pusher@demo.iam.gserviceaccount.com",
                    "private_key": pem(key),
                    "token_uri": server.url + "/token",
                }
            )
        )
        p = pipeline_factory(
            tasks_enabled=True,  # the offline_push task at the end
            offline_fcm_project_id="demo",
            offline_fcm_service_account_file=str(account),
            offline_fcm_base_url=server.url,
            offline_webhook_url=server.url + "/webhook",
            offline_webhook_secret="s3cret",
        )
        users = [p.user(i) for i in range(10)]
        tokens = RedisDeviceTokenStore(redis_url)
        for user in users[4:8]:
            await tokens.register(user, DeviceToken("fcm", f"{user}-phone", "android"))
        await tokens.register(users[8], DeviceToken("webhook", f"{users[8]}-web", "web"))
        await tokens.register(users[2], DeviceToken("fcm", f"{users[2]}-phone"))  # online
        server.invalid_tokens.add(f"{users[7]}-phone")
        worker = await p.start_worker()
        group = f"{p.tag}-g"
        await p.members.add(group, users)
        await p.gateway("gw-off", users[:4])
        await p.wait_online(worker, users[:4])
        await p.publish([group_chat(users[0], group, 1, "see you offline")])

        async def notified() -> bool:
            return len(server.pushes("/v1/")) >= 4 and len(server.pushes("/webhook")) >= 1

        await eventually(notified, 60, "notifications at the provider server")
        fcm = server.pushes("/v1/projects/demo/messages:send")
        assert sorted(r.body["message"]["token"] for r in fcm) == [f"{u}-phone" for u in users[4:8]]
        assert {r.headers["authorization"] for r in fcm} == {"Bearer access-1"}
        (hook,) = server.pushes("/webhook")
        assert [n["user"] for n in hook.body["notifications"]] == [users[8]]

        async def forgotten() -> bool:
            return await tokens.tokens([users[7]]) == {}

        await eventually(forgotten, 10, "the unregistered token to be removed")

        # The same as a typed task (offline_push): an OfflinePush in JSON, through the API.
        push = {"users": [users[5], users[8]], "message": {"msg_id": "77", "content": "a task"}}
        status, body = worker.request(
            "POST", "/api/v1/tasks", {"task_type": "offline_push", "payload": push}
        )
        assert status == 201, body

        async def ran() -> bool:
            _, status = worker.get(f"/api/v1/tasks/{body['task_id']}")
            return bool(status["state"] == "succeeded")

        await eventually(ran, 30, "the offline_push task")
        by_task = [r for r in server.pushes("/v1/") if r.body["message"]["data"]["msg_id"] == "77"]
        assert [r.body["message"]["token"] for r in by_task] == [f"{users[5]}-phone"]
        (hook,) = [
            r
            for r in server.pushes("/webhook")
            if r.body["notifications"][0]["data"]["msg_id"] == "77"
        ]
        assert [n["user"] for n in hook.body["notifications"]] == [users[8]]
        await tokens.close()
