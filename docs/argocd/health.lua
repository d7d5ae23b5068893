-- Argo CD health check for mlflow-gateway.dev/GatewayEndpoint.
-- Reads what the operator writes: status.observedGeneration and the Ready condition (with its own
-- observedGeneration), the same fields kstatus reads. Uses only the libraries Argo CD opens for a
-- custom health check (base and table).
local hs = {}
local generation = obj.metadata and obj.metadata.generation

-- Ready=False reasons that mean "still converging" rather than "needs attention".
local in_progress = { Progressing = true, Reconciling = true }

if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile the endpoint"
  return hs
end

local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. generation
  return hs
end

local ready = nil
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Ready" then
    ready = condition
  end
end

if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

if generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile generation " .. generation
  return hs
end

local detail = (ready.reason or "") .. ": " .. (ready.message or "")
if ready.status == "True" then
  hs.status = "Healthy"
elseif ready.status == "False" and not in_progress[ready.reason or ""] then
  hs.status = "Degraded"
else
  hs.status = "Progressing"
end
hs.message = detail
return hs
