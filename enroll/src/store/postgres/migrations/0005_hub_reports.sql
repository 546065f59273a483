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
