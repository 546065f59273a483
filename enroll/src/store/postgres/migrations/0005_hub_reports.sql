-- What each hub last reported of its peers (POST /v1/hub/report, every 15 s): the web
-- console's fleet page shows handshakes and refusals per site from it. One row per hub,
-- replaced by its next report.
CREATE TABLE hub_reports (
    tenant TEXT NOT NULL,
    site TEXT NOT NULL,
    at BIGINT NOT NULL,
    report TEXT NOT NULL,
    PRIMARY KEY (tenant, site)
);

-- The policy version each appliance holds, as it says when it polls for a newer one
-- (GET /v1/policy?have=N): the fleet page shows a town hall still on an old version.
CREATE TABLE policy_held (
    tenant TEXT NOT NULL,
    site TEXT NOT NULL,
    version BIGINT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (tenant, site)
);
