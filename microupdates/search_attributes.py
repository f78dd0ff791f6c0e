"""Custom search attributes that make deployments and devices searchable in the Temporal Web UI.

Example filter for all failed devices of one deployment:
`MicroupdatesDeploymentId = "dep-1a2b3c4d" AND MicroupdatesStatus = "failed"`.
"""

from __future__ import annotations

import logging

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

logger = logging.getLogger(__name__)

DEPLOYMENT_ID = SearchAttributeKey.for_keyword("MicroupdatesDeploymentId")
DEVICE_ID = SearchAttributeKey.for_keyword("MicroupdatesDeviceId")
UPDATE_VERSION = SearchAttributeKey.for_keyword("MicroupdatesUpdateVersion")
TARGET_GROUPS = SearchAttributeKey.for_keyword_list("MicroupdatesGroups")
STATUS = SearchAttributeKey.for_keyword("MicroupdatesStatus")

ALL_KEYS = (DEPLOYMENT_ID, DEVICE_ID, UPDATE_VERSION, TARGET_GROUPS, STATUS)

_INDEXED_TYPES = {
    "Keyword": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD,
    "KeywordList": IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD_LIST,
}


def type_name(key: SearchAttributeKey) -> str:
    return "KeywordList" if key is TARGET_GROUPS else "Keyword"


def dev_server_arguments() -> list[str]:
    """Return the `temporal server start-dev` arguments that register every attribute."""

    arguments = []
    for key in ALL_KEYS:
        arguments += ["--search-attribute", f"{key.name}={type_name(key)}"]
    return arguments


async def ensure_search_attributes(client: Client) -> None:
    """Register the attributes the namespace lacks.

    A server that does not allow it (a hosted namespace, say) is logged and
    left alone: the attributes must then be created by its administrator,
    and workflows fail to start until they exist.
    """

    try:
        existing = await _list_custom_attributes(client)
        missing = {
            key.name: _INDEXED_TYPES[type_name(key)]
            for key in ALL_KEYS
            if key.name not in existing
        }
        if missing:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
            )
            logger.info("Registered search attributes %s in namespace %s", sorted(missing), client.namespace)
    except RPCError as error:
        logger.warning(
            "Could not check or register the search attributes %s in namespace %s: %s",
            [key.name for key in ALL_KEYS], client.namespace, error,
        )


async def _list_custom_attributes(client: Client) -> set[str]:
    """Return the namespace's custom attribute names; empty where the server cannot list them."""

    try:
        response = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
    except RPCError as error:
        # Temporal's time-skipping test server registers attributes but does not list them.
        if error.status != RPCStatusCode.UNIMPLEMENTED:
            raise
        return set()
    return set(response.custom_attributes)
