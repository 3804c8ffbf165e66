// Calls a yikatong district node from Node.js, knowing only proto/ and certificates.
// Usage: node client.js CONFIG.json  — prints one JSON object with every answer.
'use strict';
const fs = require('fs');
const path = require('path');
const tls = require('tls');
const grpc = require('@grpc/grpc-js');
const loader = require('@grpc/proto-loader');

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const opts = { keepCase: true, enums: String, defaults: true, longs: String };
const contract = grpc.loadPackageDefinition(loader.loadSync(
  ['yikatong/v1/gate.proto', 'yikatong/v1/recognition.proto'],
  { ...opts, includeDirs: [cfg.proto_root] }));
const standard = grpc.loadPackageDefinition(loader.loadSync(
  ['health.proto', 'reflection.proto'], { ...opts, includeDirs: [path.join(__dirname, 'protos')] }));

function creds(ca, cert, key) {
  return grpc.credentials.createSsl(fs.readFileSync(ca), fs.readFileSync(key), fs.readFileSync(cert));
}
function channelOpts(serverName) {
  return { 'grpc.ssl_target_name_override': serverName, 'grpc.default_authority': serverName };
}
function unary(client, method, request) {
  return new Promise((resolve) => {
    client[method](request, { deadline: Date.now() + 5000 }, (err, resp) => {
      resolve(err ? { error: grpc.status[err.code], details: err.details } : resp);
    });
  });
}
function reflect(client, request) {
  return new Promise((resolve, reject) => {
    const call = client.ServerReflectionInfo();
    call.on('data', (resp) => { resolve(resp); call.end(); });
    call.on('error', reject);
    call.write(request);
  });
}

async function main() {
  const out = {};
  const opCreds = creds(cfg.ca, cfg.operator_cert, cfg.operator_key);
  const gate = new contract.yikatong.v1.Gate(cfg.address, opCreds, channelOpts(cfg.server_name));
  out.check = await unary(gate, 'Check', {
    card: cfg.peer_card, scene: 'SCENE_SCENIC_AREA', operator_id: cfg.operator_id, gate_id: 'js-gate-1',
  });
  out.check_bad = await unary(gate, 'Check', {
    card: { issuer_region: '5001', card_number: 'X' }, scene: 'SCENE_BUS',
    operator_id: cfg.operator_id, gate_id: 'js-gate-1',
  });

  // The same operator over TLS 1.2: the node refuses the call (its minimum is TLS 1.3).
  const tls12 = grpc.credentials.createFromSecureContext(tls.createSecureContext({
    ca: fs.readFileSync(cfg.ca), cert: fs.readFileSync(cfg.operator_cert),
    key: fs.readFileSync(cfg.operator_key), minVersion: 'TLSv1.2', maxVersion: 'TLSv1.2',
  }));
  const gate12 = new contract.yikatong.v1.Gate(cfg.address, tls12, channelOpts(cfg.server_name));
  out.check_tls12 = await unary(gate12, 'Check', {
    card: cfg.peer_card, scene: 'SCENE_BUS', operator_id: cfg.operator_id, gate_id: 'js-gate-1',
  });
  gate12.close();

  const nodeCreds = creds(cfg.peer_ca, cfg.node_cert, cfg.node_key);
  const recognition = new contract.yikatong.v1.Recognition(
    cfg.peer_address, nodeCreds, channelOpts(cfg.peer_server_name));
  out.recognize = await unary(recognition, 'Recognize', {
    card: cfg.peer_card, scene: 'SCENE_BUS', request_id: 'js-1',
  });

  const health = new standard.grpc.health.v1.Health(cfg.address, opCreds, channelOpts(cfg.server_name));
  out.health = await unary(health, 'Check', { service: 'yikatong.v1.Gate' });

  const refl = new standard.grpc.reflection.v1alpha.ServerReflection(
    cfg.address, opCreds, channelOpts(cfg.server_name));
  const list = await reflect(refl, { list_services: '' });
  out.services = list.list_services_response.service.map((s) => s.name).sort();
  const file = await reflect(refl, { file_containing_symbol: 'yikatong.v1.Gate' });
  out.gate_descriptor_bytes = file.file_descriptor_response.file_descriptor_proto
    .map((b) => Buffer.from(b).toString('latin1')).join('').includes('yikatong/v1/gate.proto');

  for (const c of [gate, recognition, health, refl]) c.close();
  process.stdout.write(JSON.stringify(out) + '\n');
}
main().catch((e) => { console.error(e); process.exit(1); });
