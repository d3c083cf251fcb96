"""A tenant's usage: the request quotas the gateway's ledger counts, and the token and spend quotas that
dialogue's counts, in one answer."""

from __future__ import annotations

import time

import grpc

from chatmesh.runtime.channels import downstream_timeout
from chatmesh.runtime.logs import get_logger
from chatmesh.runtime.settings import ServiceSettings
from chatmesh.tenancy.ledger import LedgerUnavailable, UsageLedger
from chatmesh.tenancy.limits import LimitName, Limits
from chatmesh.tenancy.messages import REQUEST_QUOTAS, usage_response
from chatmesh.v1 import chat_pb2, dialogue_pb2, dialogue_pb2_grpc

log = get_logger(__name__)

_ORDER = {name.value: index for index, name in enumerate(LimitName)}


class UsageUnavailable(Exception):
    pass


class UsageReader:
    def __init__(
        self, settings: ServiceSettings, ledger: UsageLedger, dialogue: dialogue_pb2_grpc.DialogueServiceStub
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._dialogue = dialogue

    async def read(self, tenant: str, limits: Limits, context: grpc.aio.ServicerContext) -> chat_pb2.GetUsageResponse:
        """Raises UsageUnavailable, or grpc.aio.AioRpcError from dialogue."""
        token_usage = self._dialogue.GetTokenUsage(
            dialogue_pb2.GetTokenUsageRequest(tenant=tenant, limits=limits.to_proto()),
            timeout=downstream_timeout(context, self._settings.default_deadline_seconds),
        )
        try:
            requests = await self._ledger.usage(tenant, limits, now=time.time())
        except LedgerUnavailable as error:
            token_usage.cancel()
            raise UsageUnavailable from error
        response = usage_response(tenant, limits, requests, REQUEST_QUOTAS)
        tokens = await token_usage
        response.quotas.extend(tokens.quotas)
        response.quotas.sort(key=lambda quota: _ORDER[quota.name])
        response.month_input_tokens = tokens.month_input_tokens
        response.month_output_tokens = tokens.month_output_tokens
        response.month_cost_usd = tokens.month_cost_usd
        return response
